"""Hardware presets for the planner: compute rate, memory, and link bandwidths of one GPU and its node.

A preset is a `Hardware` record; the built-in ones come from datasheets and the measurements recorded in
BENCHMARKS.md, and `threefold plan --calibrate` writes one measured on this machine (JSON, loadable with
`--gpu FILE.json`). Every time the planner charges is one of the formulas below.

Collective times follow NCCL's bus-bandwidth convention: a ring all-reduce of S bytes over n ranks moves
2 (n-1)/n * S bytes through each rank's slowest link, a reduce-scatter or an all-gather (n-1)/n * S, so

    t_allreduce(S, n)      = latency + 2 (n-1)/n * S / bw(S)
    t_reduce_scatter(S, n) = t_all_gather(S, n) = latency + (n-1)/n * S / bw(S)
    t_p2p(S)               = latency + S / bw(S)

with bw the intra-node (NVLink) figure when the group fits in one node, else the inter-node (IB) one,
reduced for small messages: bw(S) = bw * S / (S + S_half).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from threefold.metrics import GPU_PEAK_BF16_FLOPS

GIB = 2**30


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """One GPU (and its node's links) as the planner sees it. Bandwidths in GB/s (1e9 bytes/s)."""

    name: str
    peak_tflops: float
    """Dense peak of the training dtype (bf16 tensor cores on GPUs), TFLOP/s; MFU divides by it. The
    built-in presets read it from threefold.metrics.GPU_PEAK_BF16_FLOPS, the table training's MFU uses."""
    memory_gib: float
    """Device memory per GPU, GiB."""
    memory_reserve_gib: float = 3.0
    """Memory outside PyTorch's allocator (CUDA context, NCCL buffers), GiB; not available to tensors."""
    hbm_gbps: float
    """Device-memory bandwidth (what memory-bound element-wise kernels and the optimizer run at)."""
    intra_node_gbps: float
    """All-reduce bus bandwidth among the GPUs of one node (NVLink/NVSwitch)."""
    inter_node_gbps: float
    """All-reduce bus bandwidth per GPU across nodes (InfiniBand: one NIC per GPU)."""
    p2p_intra_gbps: float
    """Point-to-point bandwidth between two GPUs of a node, one direction."""
    p2p_inter_gbps: float
    """Point-to-point bandwidth between GPUs of different nodes, one direction."""
    latency_us: float = 30.0
    """Fixed cost of one collective or transfer (launch, synchronization), microseconds."""
    nic_gbps_per_node: float = 0.0
    """Line rate of all the node's network adapters together, GB/s (DGX A100: 8 x HDR 200 Gb/s = 200 GB/s).
    The presets derive inter_node_gbps from it: one NIC per GPU, NIC_EFFICIENCY of line rate achieved."""
    inter_node_latency_us: float = 5.0
    """Network latency of one step of a ring across nodes (switch hops, RDMA), microseconds: a ring
    collective over n ranks that crosses nodes takes (n - 1) such steps per pass, on top of latency_us."""
    half_bandwidth_mb: float = 8.0
    """Message size (MiB) at which a collective reaches half its large-message bandwidth: the achieved
    bandwidth of an S-byte message is bw * S / (S + half)."""
    gemm_curve: tuple[tuple[float, float], ...]
    """(GFLOP of one matmul, achieved fraction of peak) points; interpolated in log(GFLOP), clamped."""
    attention_efficiency: float = 0.35
    """Fraction of peak reached by the fused (flash) attention kernels on the causal FLOPs they execute."""
    host_op_us: float = 12.0
    """Host time to issue one eager operator (Python, dispatch, autograd bookkeeping, launch),
    microseconds: small per-GPU work makes the GPU wait for the host."""
    collective_host_us: float = 60.0
    """Host time to issue one collective through torch.distributed, microseconds."""
    host_link_gbps: float = 50.0
    """Copies between pinned host memory and the GPU, one direction (PCIe 5 x16 ~ 50): optimizer offload."""
    host_adam_gbps: float = 60.0
    """Host-memory bandwidth a fused CPU AdamW reaches over the node's cores (optimizer offload)."""
    fused_gbps: float | None = None
    """The rate at which compiled kernels (torch.compile's fused element-wise kernels, the float8 casts and
    the loss's Triton kernels) move the bytes the time model counts for them; None: hbm_gbps. These kernels
    do not all run at HBM speed, and where they don't, the rate is not the card's HBM figure
    (H100_FUSED_GBPS)."""
    float8: bool = False
    """Float8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell), where training.fp8
    runs; the planner then says what float8 would give."""

    def gemm_efficiency(self, flops: float) -> float:
        """Fraction of peak for one matmul of `flops` FLOPs (2 m n k), from the measured curve."""
        points = sorted(self.gemm_curve)
        x = math.log(max(flops, 1.0) / 1e9)
        xs = [math.log(g) for g, _ in points]
        if x <= xs[0]:
            return points[0][1]
        if x >= xs[-1]:
            return points[-1][1]
        i = next(i for i in range(1, len(xs)) if x <= xs[i])
        (x0, y0), (x1, y1) = (xs[i - 1], points[i - 1][1]), (xs[i], points[i][1])
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

    def gemm_time(self, flops: float) -> float:
        """Seconds for one matmul of `flops` FLOPs."""
        if flops <= 0:
            return 0.0
        return flops / (self.peak_tflops * 1e12 * self.gemm_efficiency(flops))

    def matmul_time(self, m: int, n: int, k: int, dtype_bytes: int = 2) -> float:
        """Seconds for an (m, k) x (k, n) matmul by its shape: the FLOPs at the curve's efficiency for
        their size, or the bytes of its operands and result at HBM bandwidth when that is longer (a thin
        inner dimension, such as attention's q k^T over a 64-128 wide head, makes it memory-bound)."""
        flops = 2.0 * m * n * k
        return max(self.gemm_time(flops), self.memory_time(dtype_bytes * (m * k + k * n + m * n)))

    def memory_time(self, nbytes: float) -> float:
        """Seconds to stream `nbytes` through device memory (memory-bound kernels)."""
        return nbytes / (self.hbm_gbps * 1e9)

    def fused_time(self, nbytes: float) -> float:
        """Seconds for compiled kernels to move `nbytes` of the time model's count (`fused_gbps`)."""
        return nbytes / ((self.fused_gbps or self.hbm_gbps) * 1e9)

    def all_reduce_time(self, nbytes: float, group_size: int, *, intra_node: bool) -> float:
        """Ring all-reduce of `nbytes` over `group_size` ranks: latency + 2 (n-1)/n * S / busbw."""
        if group_size <= 1 or nbytes <= 0:
            return 0.0
        bw = self._bandwidth(self.intra_node_gbps if intra_node else self.inter_node_gbps, nbytes)
        return (
            self._latency(2 * (group_size - 1), intra_node) + 2 * (group_size - 1) / group_size * nbytes / bw
        )

    def reduce_scatter_time(self, nbytes: float, group_size: int, *, intra_node: bool) -> float:
        """Reduce-scatter (or all-gather) of a full tensor of `nbytes`: latency + (n-1)/n * S / busbw."""
        if group_size <= 1 or nbytes <= 0:
            return 0.0
        bw = self._bandwidth(self.intra_node_gbps if intra_node else self.inter_node_gbps, nbytes)
        return self._latency(group_size - 1, intra_node) + (group_size - 1) / group_size * nbytes / bw

    all_gather_time = reduce_scatter_time

    def p2p_time(self, nbytes: float, *, intra_node: bool) -> float:
        """One point-to-point transfer of `nbytes`: latency + S / bw."""
        if nbytes <= 0:
            return 0.0
        bw = self._bandwidth(self.p2p_intra_gbps if intra_node else self.p2p_inter_gbps, nbytes)
        return self._latency(1, intra_node) + nbytes / bw

    def _latency(self, ring_steps: int, intra_node: bool) -> float:
        """Seconds of fixed cost: the launch, plus the network's per-step latency across nodes."""
        return (self.latency_us + (0.0 if intra_node else ring_steps * self.inter_node_latency_us)) * 1e-6

    def _bandwidth(self, gbps: float, nbytes: float) -> float:
        """Achieved bytes/s for one message: bw * S / (S + S_half)."""
        return gbps * 1e9 * nbytes / (nbytes + self.half_bandwidth_mb * 2**20)

    @property
    def usable_bytes(self) -> float:
        return (self.memory_gib - self.memory_reserve_gib) * GIB

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gemm_curve"] = [list(p) for p in self.gemm_curve]
        return d


# Achieved fraction of the bf16 peak of one matmul by its size (GFLOP = 2 m n k / 1e9).
# Hopper: 759 / 686 / 681 TFLOP/s (0.77 / 0.69 / 0.69) at 4096^3 / 8192^3 / 16384^3 on random data on an
# H200, and 764 TFLOP/s inside llama-1b's training step on an H100 (BENCHMARKS.md, docs/benchmarks.md's
# profile); real activations draw less power than random data, so large GEMMs hold ~0.75.
_HOPPER_GEMM = ((0.01, 0.04), (0.1, 0.2), (1.0, 0.45), (10.0, 0.62), (100.0, 0.72), (1000.0, 0.75))
# Ampere: cuBLAS reaches ~250-270 of 312 TFLOP/s on large bf16 matmuls (NVIDIA's A100 whitepaper figures
# and MLPerf-era reports); the Megatron-LM and TorchTitan rows of plan/validation.json are consistent with
# it (`threefold plan --validate`).
_AMPERE_GEMM = ((0.01, 0.08), (0.1, 0.3), (1.0, 0.6), (10.0, 0.76), (100.0, 0.83), (1000.0, 0.86))
# Blackwell: no measurement yet; Hopper's curve (calibrate with `threefold plan --calibrate`).
_BLACKWELL_GEMM = _HOPPER_GEMM

HOPPER_ATTENTION = 0.30
"""Fraction of peak torch's attention (cuDNN's flash kernels, what `attention_backend = "auto"` runs) reaches
on the causal FLOPs at llama-1b's shape, seq 2048, micro-batch 8: 26.8 ms a step on one H100
(bench/results/issue18-2026-12-06-s25/callB-h100/profile_2_old.txt) and 27.6 ms on one H200
(issue18-2026-12-04-s9/call2-profile_bf16_8.txt), each 0.29 of the dense bf16 peak; FA4 reached 0.32
(24.4 ms, issue18-2026-12-05-s16/callC-h100/profile8_fa4.txt)."""
H100_FUSED_GBPS = 4200.0
"""The h100 preset's `fused_gbps`. The time model's byte counts for compiled kernels (COMPILED_TRAFFIC,
FP8_CAST_BYTES, CE_KERNEL_READS) were fitted at the H200's 4.8 TB/s, but those kernels took only 1.1-1.2x as
long on an H100 as on an H200, not the 1.43x of their HBM figures: llama-1b, seq 2048, micro-batch 8,
compiled, torch.compile's element-wise kernels and the loss's, bf16 31.3 ms a step on the H100
(bench/results/issue18-2026-12-06-s25/callD-h100/profile_bf16.txt) against 28.1 ms on the H200
(issue18-2026-12-04-s9/call2-profile_bf16_8.txt), 1.11x; with rowwise float8 and its casts, 72.1 against
61.5 ms (callD-h100/profile_1_new.txt, issue18-2026-12-05-s14/callF-h200/rowwise_profile.txt), 1.17x. Many
of them are not bound by HBM on the H200 (the fused SwiGLU and norm kernels took the same time on both; the
transposed cast, which is, took 1.42x). 4800 / 1.15 ~ 4200; over the six compiled H100 rows of
plan/validation.json it takes the mean error from 4.4% to 2.8% (the rowwise + float8 output row from -12.6%
to -4.8%). FP8_CAST_BYTES has since been refitted on an H100 (2026-12-07), at this rate."""
NIC_EFFICIENCY = 0.88
"""Fraction of a NIC's line rate NCCL's inter-node collectives reach (nccl-tests on HDR/NDR fabrics report
85-92% of line rate as bus bandwidth)."""
HDR_X8 = 8 * 200 / 8  # GB/s per node: 8 x HDR 200 Gb/s
NDR_X8 = 8 * 400 / 8  # GB/s per node: 8 x NDR 400 Gb/s


def _network(nic_gbps_per_node: float, gpus_per_node: int = 8) -> dict[str, Any]:
    """Inter-node fields from the node's NICs: one NIC per GPU, NIC_EFFICIENCY of line rate."""
    per_gpu = nic_gbps_per_node / gpus_per_node * NIC_EFFICIENCY
    return dict(nic_gbps_per_node=nic_gbps_per_node, inter_node_gbps=per_gpu, p2p_inter_gbps=per_gpu)


PRESETS: dict[str, Hardware] = {
    # DGX A100 80GB (the paper's machine): NVLink3 600 GB/s per GPU (both directions), 8 x 200 Gb/s HDR
    # InfiniBand per node (25 GB/s per GPU).
    "a100-80gb": Hardware(
        name="a100-80gb",
        peak_tflops=GPU_PEAK_BF16_FLOPS["a100"] / 1e12,
        memory_gib=80.0,
        hbm_gbps=2039.0,
        intra_node_gbps=230.0,
        p2p_intra_gbps=250.0,
        **_network(HDR_X8),
        gemm_curve=_AMPERE_GEMM,
        attention_efficiency=0.5,
    ),
    # DGX A100 40GB: the same node (NVLink3, 8 x HDR 200 Gb/s) with HBM2 at 1555 GB/s.
    "a100-40gb": Hardware(
        name="a100-40gb",
        peak_tflops=GPU_PEAK_BF16_FLOPS["a100"] / 1e12,
        memory_gib=40.0,
        hbm_gbps=1555.0,
        intra_node_gbps=230.0,
        p2p_intra_gbps=250.0,
        **_network(HDR_X8),
        gemm_curve=_AMPERE_GEMM,
        attention_efficiency=0.5,
    ),
    # H100 SXM 80GB: NVLink4 900 GB/s per GPU (both directions); nodes with 8 x 400 Gb/s NDR (50 GB/s/GPU).
    "h100": Hardware(
        name="h100",
        float8=True,
        peak_tflops=GPU_PEAK_BF16_FLOPS["h100"] / 1e12,
        memory_gib=79.6,
        hbm_gbps=3350.0,
        intra_node_gbps=340.0,
        p2p_intra_gbps=370.0,
        **_network(NDR_X8),
        gemm_curve=_HOPPER_GEMM,
        attention_efficiency=HOPPER_ATTENTION,
        fused_gbps=H100_FUSED_GBPS,
    ),
    # H200 SXM 141GB: the H100's compute and NVLink with faster, larger HBM3e. All-reduce bus bandwidth
    # 340-354 GB/s measured on 4 NVLink-connected H200s (BENCHMARKS.md).
    "h200": Hardware(
        name="h200",
        float8=True,
        peak_tflops=GPU_PEAK_BF16_FLOPS["h200"] / 1e12,
        memory_gib=140.4,
        hbm_gbps=4800.0,
        intra_node_gbps=340.0,
        p2p_intra_gbps=370.0,
        **_network(NDR_X8),
        gemm_curve=_HOPPER_GEMM,
        attention_efficiency=HOPPER_ATTENTION,
    ),
    # B200 (HGX B200): 2.25 PFLOP/s dense bf16 per GPU at 1000 W, 180 GB HBM3e at 8 TB/s, NVLink5 1.8 TB/s
    # per GPU (both directions), 8 x 400 Gb/s ConnectX-7 per node. Collective and GEMM efficiencies are
    # Hopper's scaled by the datasheet until measured.
    "b200": Hardware(
        name="b200",
        float8=True,
        peak_tflops=GPU_PEAK_BF16_FLOPS["b200"] / 1e12,
        memory_gib=178.0,
        hbm_gbps=8000.0,
        intra_node_gbps=680.0,
        p2p_intra_gbps=740.0,
        **_network(NDR_X8),
        gemm_curve=_BLACKWELL_GEMM,
    ),
}

PRESET_SOURCES: dict[str, dict[str, str]] = {
    "a100-80gb": {
        "peak_tflops": "NVIDIA A100 datasheet: 312 TFLOP/s dense bf16",
        "memory_gib": "datasheet: 80 GB HBM2e",
        "hbm_gbps": "datasheet: 2,039 GB/s (SXM4 80GB)",
        "intra_node_gbps": "NVLink3 600 GB/s per GPU both directions (300 per direction); NCCL all-reduce "
        "bus bandwidth on DGX A100 ~230 GB/s (nccl-tests reports)",
        "inter_node_gbps": "DGX A100: 8 x HDR 200 Gb/s InfiniBand per node = 25 GB/s per GPU; ~22 achieved",
        "gemm_curve": "cuBLAS bf16 ~250-270 TFLOP/s on large shapes; fits the Megatron-LM 2021 and "
        "TorchTitan A100 rows of plan/validation.json",
        "attention_efficiency": "FlashAttention-2 paper: 50-73% of A100 peak forward, less backward",
    },
    "a100-40gb": {
        "peak_tflops": "NVIDIA A100 datasheet: 312 TFLOP/s dense bf16",
        "hbm_gbps": "datasheet: 1,555 GB/s (SXM4 40GB)",
        "links": "DGX A100 (NVLink3, 8 x HDR 200 Gb/s): as a100-80gb",
    },
    "h100": {
        "peak_tflops": "NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16",
        "hbm_gbps": "datasheet: 3.35 TB/s; 3.0 TB/s measured copy (BENCHMARKS.md)",
        "intra_node_gbps": "NVLink4 900 GB/s per GPU both directions; ~340 GB/s all-reduce bus bandwidth "
        "(as measured on H200, same NVLink)",
        "inter_node_gbps": "DGX/HGX H100: 8 x NDR 400 Gb/s per node = 50 GB/s per GPU; ~45 achieved",
        "gemm_curve": "690-770 TFLOP/s bf16 measured on large random matrices (BENCHMARKS.md)",
        "attention_efficiency": "cuDNN's flash attention in llama-1b's step: 0.29 of peak (HOPPER_ATTENTION)",
        "fused_gbps": "compiled kernels 1.1-1.2x as long as on the H200 in llama-1b's step (H100_FUSED_GBPS)",
    },
    "h200": {
        "peak_tflops": "NVIDIA H200 SXM datasheet: 989 TFLOP/s dense bf16",
        "hbm_gbps": "datasheet: 4.8 TB/s HBM3e",
        "intra_node_gbps": "measured: NCCL all-reduce bus bandwidth 340-354 GB/s on 4 H200 (BENCHMARKS.md)",
        "inter_node_gbps": "HGX H200 with 8 x NDR 400 Gb/s per node = 50 GB/s per GPU; ~45 achieved",
        "gemm_curve": "759 / 686 / 681 TFLOP/s at 4096^3 / 8192^3 / 16384^3 measured (BENCHMARKS.md)",
        "attention_efficiency": "cuDNN's flash attention in llama-1b's step: 0.29 of peak (HOPPER_ATTENTION)",
    },
    "b200": {
        "peak_tflops": "NVIDIA HGX B200 datasheet: 2.25 PFLOP/s dense bf16 per GPU",
        "hbm_gbps": "datasheet: 8 TB/s HBM3e, 180 GB",
        "intra_node_gbps": "NVLink5 1.8 TB/s per GPU both directions: Hopper's measured ratio, doubled",
        "inter_node_gbps": "8 x 400 Gb/s ConnectX-7 per node = 50 GB/s per GPU; ~45 achieved",
        "gemm_curve": "not measured: Hopper's fractions (run `threefold plan --calibrate` on the machine)",
    },
}
"""Where each preset value comes from (printed by `threefold plan --explain`)."""


def load_hardware(name_or_path: str) -> Hardware:
    """A built-in preset by name, or a JSON file written by `threefold plan --calibrate`."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.suffix == ".json":
        raise ValueError(
            f"unknown GPU {name_or_path!r}; choose one of {', '.join(PRESETS)} or a preset .json"
        )
    if not path.is_file():
        raise ValueError(f"GPU preset file {str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"GPU preset file {str(path)!r} is not valid JSON: {e}") from None
    return hardware_from_dict(raw, source=str(path))


def hardware_from_dict(raw: dict[str, Any], *, source: str = "preset") -> Hardware:
    known = {f.name for f in dataclasses.fields(Hardware)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {source}; known: {sorted(known)}")
    values = dict(raw)
    values["gemm_curve"] = tuple((float(g), float(f)) for g, f in values.get("gemm_curve", ()))
    if not values["gemm_curve"]:
        raise ValueError(f"{source} needs a non-empty gemm_curve of [GFLOP, fraction] points")
    try:
        hw = Hardware(**values)
    except TypeError as e:
        raise ValueError(f"{source}: {e}") from None
    for key in ("peak_tflops", "memory_gib", "hbm_gbps", "intra_node_gbps", "inter_node_gbps",
                "p2p_intra_gbps", "p2p_inter_gbps"):  # fmt: skip
        if not getattr(hw, key) > 0:
            raise ValueError(f"{source}: {key} must be positive, got {getattr(hw, key)}")
    return hw


def save_hardware(hw: Hardware, path: str | Path) -> None:
    Path(path).write_text(json.dumps(hw.to_dict(), indent=2) + "\n")


def preset_for_device(device_name: str) -> Hardware | None:
    """The built-in preset matching a `torch.cuda.get_device_name()` string, or None."""
    name = device_name.lower()
    if "h200" in name:
        return PRESETS["h200"]
    if "h100" in name:
        return PRESETS["h100"]
    if "b200" in name:
        return PRESETS["b200"]
    if "a100" in name:
        return PRESETS["a100-40gb" if "40gb" in name else "a100-80gb"]
    return None
