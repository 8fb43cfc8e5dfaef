"""Time per training step of a layout on given hardware, term by term.

Notation as in threefold.plan.memory_model; n_tok = b s tokens per micro-batch, g GPUs per node, and every
time below is per micro-batch on one GPU unless it says "per step".

Compute of one layer (forward; backward = 2x the matmuls, 2.5x the attention core, 2x the memory traffic):
    matmuls       each GEMM of 2 n_tok k N FLOPs at the hardware's efficiency for that size:
                  llama q, k, v, o, gate, up, down (widths h_q/t, h_kv/t, f/t); gpt2 q, k, v, o, up, down
    attention     causal core: 2 b s^2 h_q / t FLOPs forward at `attention_efficiency`
    element-wise  memory-bound bytes / HBM bandwidth: norms and residual adds (replicated over t unless
                  sequence parallel), RoPE and the k/v repeat (per head), the MLP activation (per f/t)
    recompute     full: one more forward of the layer in backward (its TP all-reduces included);
                  selective: one more forward of the attention core
Head: the final norm, the logits GEMM (2 n_tok h V_p/t) and the cross-entropy's passes over the local
logits; embedding: the lookup, and the dense gradient of the table in backward. After each micro-batch's
backward every parameter's gradient is added to its fp32 main_grad: (8 + e) P_r bytes.

Communication:
    TP      4 all-reduces of e b s h per layer per micro-batch (2 forward, 2 backward; +2 with full
            recompute; sequence parallelism turns each into a reduce-scatter and an all-gather: same time),
            1 for the embedding and 1 for the head. Not overlapped. Intra-node when t <= g.
    PP      per chunk and micro-batch, the activation forward and its gradient backward: e b s_ h bytes,
            1/t of it per TP rank with scatter/gather (then an intra-node all-gather of e b s h).
            Intra-node when the whole job fits in a node (n <= g); otherwise some boundary crosses nodes.
    DP      per step, the all-reduce of the fp32 gradients (4 P_r bytes) or, with ZeRO-1, their
            reduce-scatter plus the all-gather of the updated parameters (e P_r). The gradient collective
            starts during the last micro-batch's backward and hides behind it (up to the last bucket);
            the ZeRO all-gather follows the optimizer step and is exposed. Intra-node when t d <= g.

Pipeline (the paper's bubble): with C_r the per-micro-batch time of pipeline rank r (its v chunks, forward
and backward, with its TP and p2p communication),
    T_pipeline = m max_r C_r + (p - 1) / v * mean_r C_r,   bubble fraction = (p - 1) / (v m)
which is (m + (p - 1) / v) (t_f + t_b) for balanced stages, and charges the heavier last stage (head and
loss) on every micro-batch.

Per step: T = T_pipeline + exposed DP communication + optimizer (memory-bound AdamW over the rank's
shard, about 48 + e bytes per parameter, 4 + (44 + e) / d with ZeRO-1) + a fixed overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

from threefold.config import Config
from threefold.metrics import flops_per_token, local_kv_heads, local_vocab_size
from threefold.pipeline.partition import chunk_layer_ranges, chunks_of_rank
from threefold.plan.hardware import Hardware
from threefold.plan.layout import Layout, Workload, from_config
from threefold.plan.memory_model import rank_parameters

# Memory-bound bytes per element of one forward pass (backward: BACKWARD_TRAFFIC x), counted from the
# element-wise kernels threefold.model.transformer runs in eager mode.
LLAMA_BYTES_PER_H = 64.0
"""Two RMSNorms (cast to fp32, normalize, cast back, scale: ~26 bytes each) and two residual adds."""
GPT2_BYTES_PER_H = 28.0
"""Two LayerNorms (~8 bytes each) and two residual adds with their biases."""
ROPE_BYTES_PER_QK = 52.0
"""RoPE in fp32 on q and k: cast, rotate (neg, cat), two products, sum, cast back."""
MLP_BYTES_PER_F = 10.0
"""SwiGLU silu(gate) * up, or GeLU plus its bias (per element of the local f/t width, bf16)."""
CE_FORWARD_BYTES = 38.0
"""Cross-entropy forward per local logit: fp32 copy, max, subtract, exp, sum, divide."""
CE_BACKWARD_BYTES = 14.0
"""Cross-entropy backward per local logit: softmax minus one-hot, scale, cast to the compute dtype."""
BACKWARD_TRAFFIC = 2.0
ATTENTION_BACKWARD_FLOPS = 2.5
"""Flash attention's backward executes about 2.5x the forward FLOPs (it recomputes the scores)."""
DP_OVERLAP = 0.9
"""Fraction of the last micro-batch's backward the gradient collective can hide behind."""
HOST_OPS_FORWARD = 50
"""Eager operators issued by one layer's forward (norms, projections, RoPE, attention, MLP, residuals)."""
HOST_OPS_BACKWARD = 110
"""Autograd nodes run by one layer's backward, with the gradient hooks that fill main_grad."""
STEP_OVERHEAD_S = 0.005
"""Per step: host synchronization, loss and gradient-norm all-reduces, Python."""


@dataclass(frozen=True)
class StepTime:
    """Seconds per training step, with its parts (per GPU, slowest pipeline rank where it matters)."""

    step: float
    pipeline: float
    """m max_r C_r + (p - 1)/v mean_r C_r."""
    compute: float
    """Per step on the slowest rank: forwards, backwards, recomputation (m max_r of its compute)."""
    tp_comm: float
    pp_comm: float
    dp_exposed: float
    optimizer: float
    bubble: float
    """Time of the bubble, (p - 1)/v mean_r C_r."""
    bubble_fraction: float
    """(p - 1) / (v m)."""
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: float

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class _Pass:
    """Forward and backward seconds of one piece of the model for one micro-batch."""

    forward: float
    backward: float
    tp: float = 0.0

    def __add__(self, other: _Pass) -> _Pass:
        return _Pass(self.forward + other.forward, self.backward + other.backward, self.tp + other.tp)

    def scaled(self, k: float) -> _Pass:
        return _Pass(self.forward * k, self.backward * k, self.tp * k)


def _gemms(hw: Hardware, shapes: list[tuple[int, int, int]]) -> float:
    """Seconds of the forward matmuls (n_tok, k) x (k, N): each 2 n_tok k N FLOPs."""
    return sum(hw.gemm_time(2.0 * n * k * out) for n, k, out in shapes)


def layer_pass(w: Workload, lay: Layout, hw: Hardware, *, intra_tp: bool) -> _Pass:
    """One transformer layer, one micro-batch: compute (with recomputation) and its TP all-reduces."""
    m, par = w.model, lay.parallel
    b, s, e, t = lay.micro_batch_size, w.seq_len, w.dtype_bytes, par.tp_size  # the docstring's notation
    f = m.ffn_hidden_size
    assert f is not None and m.num_kv_heads is not None
    h, n = m.hidden_size, b * s
    hq = m.num_heads * m.head_dim
    hkv_local = local_kv_heads(m.num_kv_heads, t) * m.head_dim  # one replicated head when t > kv heads
    sp = par.sequence_parallel and t > 1
    shapes = [(n, h, hq // t), (n, h, hkv_local), (n, h, hkv_local), (n, hq // t, h), (n, f // t, h)]
    shapes += [(n, h, f // t)] * (2 if m.arch == "llama" else 1)
    gemm = _gemms(hw, shapes)
    core_flops = 2.0 * b * s * s * hq / t
    core = core_flops / (hw.peak_tflops * 1e12 * hw.attention_efficiency)
    replicated = n / (t if sp else 1) * h
    if m.arch == "llama":
        traffic = LLAMA_BYTES_PER_H * replicated + ROPE_BYTES_PER_QK * n * (hq / t + hkv_local)
        traffic += 2 * e * n * (hq / t + hkv_local)  # repeat k and v to the query heads
    else:
        traffic = GPT2_BYTES_PER_H * replicated
    traffic += MLP_BYTES_PER_F * n * f / t
    elementwise = hw.memory_time(traffic)
    all_reduce = hw.all_reduce_time(e * n * h, t, intra_node=intra_tp)
    forward = gemm + core + elementwise
    backward = 2 * gemm + ATTENTION_BACKWARD_FLOPS * core + BACKWARD_TRAFFIC * elementwise
    num_all_reduce = 4 if t > 1 else 0
    host_ops = HOST_OPS_FORWARD + HOST_OPS_BACKWARD
    if lay.recompute == "full":
        backward += forward
        num_all_reduce += 2 if t > 1 else 0
        host_ops += HOST_OPS_FORWARD
    elif lay.recompute == "selective":
        backward += core
        host_ops += 5
    tp_time = num_all_reduce * all_reduce
    # The host issues work asynchronously; when the GPU's share of a layer is small it waits for the host.
    host = (host_ops * hw.host_op_us + num_all_reduce * hw.collective_host_us) * 1e-6
    slack = max(0.0, host - (forward + backward + tp_time))
    return _Pass(forward, backward + slack, tp_time)


def head_pass(w: Workload, lay: Layout, hw: Hardware, *, intra_tp: bool) -> _Pass:
    """Final norm, logits GEMM and cross-entropy over V_p/t columns, for one micro-batch."""
    t, e = lay.parallel.tp_size, w.dtype_bytes
    h, n, vloc = (
        w.model.hidden_size,
        lay.micro_batch_size * w.seq_len,
        local_vocab_size(w.model.vocab_size, t),
    )
    gemm = _gemms(hw, [(n, h, vloc)])
    norm = hw.memory_time(LLAMA_BYTES_PER_H / 2 * n * h)
    forward = gemm + norm + hw.memory_time(CE_FORWARD_BYTES * n * vloc)
    backward = 2 * gemm + 2 * norm + hw.memory_time(CE_BACKWARD_BYTES * n * vloc)
    tp_time = hw.all_reduce_time(e * n * h, t, intra_node=intra_tp) + 3 * hw.all_reduce_time(
        4 * n, t, intra_node=intra_tp
    )
    return _Pass(forward, backward, tp_time)


def embedding_pass(w: Workload, lay: Layout, hw: Hardware, *, intra_tp: bool) -> _Pass:
    """Lookup forward; the dense gradient of the V_p/t x h table in backward."""
    t, e = lay.parallel.tp_size, w.dtype_bytes
    h, n, vloc = (
        w.model.hidden_size,
        lay.micro_batch_size * w.seq_len,
        local_vocab_size(w.model.vocab_size, t),
    )
    forward = hw.memory_time(2 * e * n * h)
    backward = hw.memory_time(2 * e * vloc * h + 2 * e * n * h)
    return _Pass(forward, backward, hw.all_reduce_time(e * n * h, t, intra_node=intra_tp))


def boundary_transfer(w: Workload, lay: Layout, hw: Hardware, *, intra_pp: bool) -> float:
    """Seconds of one pipeline boundary crossing (an activation forward or its gradient backward), on the
    critical path: the p2p transfer, and the all-gather that reassembles it under scatter/gather."""
    par = lay.parallel
    t = par.tp_size
    if par.pp_size == 1:
        return 0.0
    sp = par.sequence_parallel and t > 1
    boundary = (
        w.dtype_bytes * lay.micro_batch_size * (w.seq_len // t if sp else w.seq_len) * w.model.hidden_size
    )
    scatter = par.scatter_gather and t > 1 and not sp
    transfer = hw.p2p_time(boundary / t if scatter else boundary, intra_node=intra_pp)
    if scatter:
        transfer += hw.all_gather_time(boundary, t, intra_node=True)
    return transfer


def data_parallel_tail(
    lay: Layout,
    hw: Hardware,
    params: int,
    *,
    dtype_bytes: int,
    backward: float,
    intra_dp: bool,
    num_microbatches: int = 1,
) -> tuple[float, float]:
    """(exposed data-parallel communication, optimizer step) seconds per step of a rank holding `params`
    parameters whose last micro-batch's backward takes `backward` seconds.

    ZeRO-2/3 reduce-scatter every micro-batch (the earlier ones hidden behind their backward like the
    last one's); ZeRO-3 all-gathers the parameters before every forward and backward instead of once
    after the update, prefetched behind the previous layer's compute (counted as hidden as the reduction
    is). Offload: the host AdamW (28 bytes per parameter through host memory) pipelined with the copies
    down and up, the slowest of the three setting the pace.
    """
    d, e, stage = lay.parallel.dp_size, dtype_bytes, int(lay.parallel.zero)
    grads = 4.0 * params
    if stage and d > 1:
        rounds = num_microbatches if stage >= 2 else 1
        dp_comm = rounds * hw.reduce_scatter_time(grads, d, intra_node=intra_dp)
        gather = hw.all_gather_time(e * params, d, intra_node=intra_dp)
        if stage >= 3:
            dp_comm += 2 * num_microbatches * gather
            gather = 0.0
        opt_bytes = 4 * params + (44 + e) * params / d
    else:
        dp_comm = hw.all_reduce_time(grads, d, intra_node=intra_dp)
        gather = 0.0
        opt_bytes = (48 + e) * params if e == 2 else 44 * params
    last_bucket = hw.all_reduce_time(min(grads, 25 * 2**20), d, intra_node=intra_dp)
    hidden = DP_OVERLAP * backward * (num_microbatches if stage >= 2 else 1)
    exposed = max(dp_comm - hidden, min(dp_comm, last_bucket)) + gather
    optimizer = hw.memory_time(opt_bytes)
    if lay.offload:
        on_host = params / (d if stage else 1) * lay.offload_fraction
        cpu = 28 * on_host / (hw.host_adam_gbps * 1e9)
        link = 4 * on_host / (hw.host_link_gbps * 1e9)
        optimizer = optimizer * (1 - lay.offload_fraction) + max(cpu, link)
    return exposed, optimizer


def estimate_layout_time(w: Workload, lay: Layout, hw: Hardware, *, gpus_per_node: int) -> StepTime:
    """Step time of `lay` for workload `w` (see the module docstring for every term)."""
    m, e, s, par = w.model, w.dtype_bytes, w.seq_len, lay.parallel
    p, v = par.pp_size, par.num_model_chunks
    n_gpus = lay.num_gpus
    num_mb = lay.num_microbatches(w.global_batch_size)
    intra_tp = par.tp_size <= gpus_per_node
    intra_dp = par.tp_size * par.dp_size <= gpus_per_node
    layer = layer_pass(w, lay, hw, intra_tp=intra_tp)
    head = head_pass(w, lay, hw, intra_tp=intra_tp)
    embed = embedding_pass(w, lay, hw, intra_tp=intra_tp)
    transfer = boundary_transfer(w, lay, hw, intra_pp=n_gpus <= gpus_per_node)

    ranges = chunk_layer_ranges(m.num_layers, p, v)
    last = len(ranges) - 1
    per_rank, compute_rank, tp_rank, pp_rank_time, dp_tail = [], [], [], [], []
    for pp_rank in range(p):
        work = _Pass(0.0, 0.0)
        for c in chunks_of_rank(pp_rank, p, v):
            work = work + layer.scaled(ranges[c][1] - ranges[c][0])
            if c == 0:
                work = work + embed
            if c == last:
                work = work + head
        params = rank_parameters(w, lay, pp_rank)
        accumulate = hw.memory_time((8 + e) * params)  # .grad into the fp32 main_grad, every micro-batch
        p2p = 2 * v * transfer
        compute = work.forward + work.backward + accumulate
        per_rank.append(compute + work.tp + p2p)
        compute_rank.append(compute)
        tp_rank.append(work.tp)
        pp_rank_time.append(p2p)
        # Data parallelism and the optimizer, once per step.
        dp_tail.append(
            data_parallel_tail(
                lay,
                hw,
                params,
                dtype_bytes=e,
                backward=work.backward,
                intra_dp=intra_dp,
                num_microbatches=num_mb,
            )
        )

    slowest = max(range(p), key=lambda r: per_rank[r])
    mean = sum(per_rank) / p
    bubble = (p - 1) / v * mean
    pipeline = num_mb * per_rank[slowest] + bubble
    dp_exposed, optimizer = max(dp_tail, key=lambda x: x[0] + x[1])
    step = pipeline + dp_exposed + optimizer + STEP_OVERHEAD_S
    tokens = w.global_batch_size * s / (step * n_gpus)
    tflops = tokens * flops_per_token(m, s) / 1e12
    return StepTime(
        step=step,
        pipeline=pipeline,
        compute=num_mb * compute_rank[slowest],
        tp_comm=num_mb * tp_rank[slowest],
        pp_comm=num_mb * pp_rank_time[slowest],
        dp_exposed=dp_exposed,
        optimizer=optimizer,
        bubble=bubble,
        bubble_fraction=(p - 1) / (v * num_mb),
        tokens_per_s_per_gpu=tokens,
        tflops_per_gpu=tflops,
        mfu=tflops / hw.peak_tflops,
    )


def estimate_step_time(config: Config, hardware: Hardware, *, gpus_per_node: int | None = None) -> StepTime:
    """Predicted step time of `config`'s layout on `hardware` (gpus_per_node: default all in one node)."""
    workload, layout = from_config(config)
    return estimate_layout_time(workload, layout, hardware, gpus_per_node=gpus_per_node or layout.num_gpus)
