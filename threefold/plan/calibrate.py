"""Measure this machine for the planner: matmul rate over a few sizes, memory bandwidth, causal attention's
rate, and (with several ranks) all-reduce and point-to-point bandwidth; the result is a `Hardware` preset
saved as JSON.

bf16 matmuls on CUDA, fp32 on CPU. The GEMM curve stores each size's achieved fraction of the peak: the
datasheet peak for a known GPU, else the best rate measured (so the curve tops out at 1.0).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from threefold.metrics import peak_flops
from threefold.plan.hardware import GIB, PRESETS, Hardware, preset_for_device

TIMED_SPAN_S = 0.01
"""Each timing runs `fn` back to back for about this long, so that one launch and one synchronization
(tens of microseconds) do not count against a kernel of a few microseconds, as they would not in training."""
MAX_TIMED_CALLS = 1 << 14


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _span(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Seconds of `calls` back-to-back calls of `fn`, the work done (synchronized) at both ends."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return time.perf_counter() - start


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of one call of `fn`: each repeat times enough back-to-back calls to fill
    TIMED_SPAN_S (found by doubling from one, after a warm-up call)."""
    _span(fn, device, 1)  # warm-up: the first call pays for library handles and kernel selection
    calls = 1
    while calls < MAX_TIMED_CALLS and _span(fn, device, calls) < TIMED_SPAN_S:
        calls *= 2
    times = [_span(fn, device, calls) / calls for _ in range(repeats)]
    return sorted(times)[len(times) // 2]


def measure_gemm(device: torch.device, sizes: list[int], repeats: int = 5) -> list[tuple[float, float]]:
    """(GFLOP, TFLOP/s) of square matmuls of each size: 2 n^3 FLOPs each."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = []
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = _timed(lambda: torch.mm(a, b), device, repeats)  # noqa: B023 - timed right here
        flops = 2.0 * n**3
        out.append((flops / 1e9, flops / seconds / 1e12))
    return out


def measure_attention_efficiency(
    device: torch.device, peak_tflops: float, *, seq_len: int, num_heads: int = 16, head_dim: int = 128,
    repeats: int = 5,
) -> float:  # fmt: skip
    """Fraction of `peak_tflops` that causal scaled-dot-product attention reaches, forward and backward, on
    the FLOPs the time model charges it: 2 s^2 h_q forward (causal half of q k^T and p v), 2.5x backward."""
    import torch.nn.functional as F

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (
        torch.randn(1, num_heads, seq_len, head_dim, device=device, dtype=dtype, requires_grad=True)
        for _ in range(3)
    )

    def step() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()

    seconds = _timed(step, device, repeats)
    flops = 3.5 * 2.0 * seq_len * seq_len * num_heads * head_dim
    return min(1.0, flops / seconds / (peak_tflops * 1e12))


def measure_copy_gbps(device: torch.device, mib: int, repeats: int = 5) -> float:
    """Device-memory bandwidth from a large copy (read + write)."""
    src = torch.empty(mib * 2**20 // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / seconds / 1e9


def measure_collectives(device: torch.device, mib: int, repeats: int = 5) -> tuple[float, float]:
    """(all-reduce bus bandwidth over the whole world, rank 0 -> 1 point-to-point bandwidth), GB/s.

    Every rank must call it. Bus bandwidth = 2 (n-1)/n * S / time, NCCL's convention."""
    world, rank = dist.get_world_size(), dist.get_rank()
    buf = torch.ones(mib * 2**20 // 4, device=device, dtype=torch.float32)
    seconds = _timed(lambda: dist.all_reduce(buf), device, repeats)
    nbytes = buf.numel() * 4
    busbw = 2 * (world - 1) / world * nbytes / seconds / 1e9

    def exchange() -> None:
        if rank == 0:
            dist.send(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)

    seconds = _timed(exchange, device, repeats)
    dist.barrier()
    return busbw, nbytes / seconds / 1e9


def calibrate(
    device: torch.device,
    *,
    name: str,
    sizes: list[int] | None = None,
    collective_mib: int = 256,
    intra_node: bool = True,
) -> Hardware:
    """A Hardware preset measured on `device` (collectives too when a process group is initialized)."""
    cuda = device.type == "cuda"
    sizes = sizes or ([1024, 2048, 4096, 8192] if cuda else [128, 256, 512])
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    base = preset_for_device(device_name) or PRESETS["h100"]
    gemm = measure_gemm(device, sizes)
    peak = (peak_flops(device_name) or 0.0) / 1e12 or max(rate for _, rate in gemm)
    values = dataclasses.asdict(base)
    values.update(
        name=name,
        peak_tflops=peak,
        gemm_curve=tuple((gflop, min(1.0, rate / peak)) for gflop, rate in gemm),
        hbm_gbps=measure_copy_gbps(device, 1024 if cuda else 64),
        attention_efficiency=measure_attention_efficiency(device, peak, seq_len=4096 if cuda else 256),
    )
    if cuda:
        values["memory_gib"] = torch.cuda.get_device_properties(device).total_memory / GIB
        values["float8"] = torch.cuda.get_device_capability(device) >= (8, 9)
    else:
        values.update(memory_gib=_host_memory_gib(), memory_reserve_gib=1.0, float8=False)
    if dist.is_initialized() and dist.get_world_size() > 1:
        busbw, p2p = measure_collectives(device, collective_mib if cuda else 16)
        if intra_node:
            values.update(intra_node_gbps=busbw, p2p_intra_gbps=p2p)
        else:
            values.update(inter_node_gbps=busbw, p2p_inter_gbps=p2p)
    return Hardware(**values)


def _host_memory_gib() -> float:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return 16.0
