"""Time per training step of a layout on given hardware, term by term.

Notation as in threefold.plan.memory_model; n_tok = b s tokens per micro-batch, g GPUs per node, and every
time below is per micro-batch on one GPU unless it says "per step".

Compute of one layer (forward; backward = 2x the matmuls, 2.5x the attention core, 2x the memory traffic):
    matmuls       each (n_tok, k) x (k, N) matmul by its shape (`Hardware.matmul_time`): 2 n_tok k N FLOPs
                  at the efficiency for that size, or its operands' bytes at HBM bandwidth if longer:
                  llama q, k, v, o, gate, up, down (widths h_q/t, h_kv/t, f/t); gpt2 q, k, v, o, up, down
    attention     flash (`Kernels.attention`): causal core, 2 b s^2 h_q / t FLOPs forward at
                  `attention_efficiency`; materialized: q k^T and p v per head over the whole s x s square
                  as matmuls, and the softmax (and dropout) over b a/t s^2 scores by bytes
    element-wise  memory-bound bytes / HBM bandwidth: norms and residual adds (replicated over t unless
                  sequence parallel), RoPE and the k/v repeat (per head), the MLP activation (per f/t),
                  dropout when on; eager kernels at EAGER_BANDWIDTH_FRACTION of the bandwidth, compiled
                  ones moving COMPILED_TRAFFIC of the bytes
    recompute     full: one more forward of the layer in backward (its TP all-reduces included);
                  selective: one more forward of the attention core
Head: the final norm, the logits GEMM (2 n_tok h V_p/t) and the cross-entropy's passes over the local
logits; embedding: the lookup, and the dense gradient of the table in backward. After each micro-batch's
backward every parameter's gradient is added to its fp32 main_grad: (8 + e) P_r bytes; none with direct
gradients (`Layout.direct_grads`: one GPU, one micro-batch a step, no offload), which stay autograd's.

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
            the ZeRO all-gather runs behind the next step's first forward (up to its first bucket).
            Intra-node when t d <= g. Without overlap (Kernels.dp_overlap off) both are exposed.

    CP      c context-parallel ranks each hold s/c tokens of every sequence: every per-token term counts
            b s/c tokens, the causal core 1/c of the whole sequence's work. Ring attention passes K/V
            blocks c - 1 times per layer forward (e b s/c h_kv/t bytes each) and, in backward, K/V plus
            their fp32 dK/dV c times; the transfers overlap the core's blocks, and only what exceeds
            the core is exposed. All-to-all instead exposes four all-to-alls (q, k, v, output) forward
            and four backward, each moving (c-1)/c of the rank's e b s/c (h_q + h_kv)/t-sized tensors.
            The gradients are averaged over the d c ranks holding the same weights (ZeRO shards over
            them). Intra-node when t c <= g.

Pipeline (the paper's bubble): with C_r the per-micro-batch time of pipeline rank r (its v chunks, forward
and backward, with its TP and p2p communication),
    T_pipeline = m max_r C_r + (p - 1) / v * mean_r C_r,   bubble fraction = (p - 1) / (v m)
which is (m + (p - 1) / v) (t_f + t_b) for balanced stages, and charges the heavier last stage (head and
loss) on every micro-batch. The zero-bubble schedules (ZB-H1, ZB-V) replace (p - 1) / v by the
simulator's idle time with F = B = W (`bubble_stages`): (p - 1) / 3 and about (p - 1) / 6. ZB-V places
chunks 0 and 2p - 1 on rank 0, which then runs both the embedding and the head and loss.

Per step: T = T_pipeline + exposed DP communication + optimizer (memory-bound AdamW over the rank's
shard, about 48 + e bytes per parameter, 4 + (44 + e) / d with ZeRO-1; direct bf16 gradients: the norm
and the update read e bytes of each gradient instead of 4, 48 + e - 2 (4 - e)) + a fixed overhead.
`StepTime.terms` splits T of the slowest pipeline rank by TERMS (`threefold plan --explain`); the
validation set, threefold/plan/validation.json, checks the whole against published and measured runs
(`threefold plan --validate`, docs/planner.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from threefold.config import Config, ModelConfig
from threefold.config.sections import caches_fp8_weights
from threefold.metrics import flops_per_token, local_kv_heads, local_vocab_size
from threefold.pipeline.partition import chunks_of_rank
from threefold.pipeline.schedules import SPLIT_BACKWARD, V_SHAPED
from threefold.plan.hardware import Hardware
from threefold.plan.layout import Layout, Workload, from_config
from threefold.plan.memory_model import layer_ranges, rank_parameters

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
CE_KERNEL_READS = (1.0, 2.0)
"""Compiled runs (training.compile, where Triton runs): the loss's two Triton kernels move this many times
the compute dtype's bytes a local logit, forward and backward (threefold.model.loss: one read for each
row's max and sum of exponentials; one read and one write for the gradient). The eager figures above are
for torch's ops on an fp32 copy. Measured on one H100 (2026-12-06, bench/results/issue18-2026-12-06-s25/
callB-h100/profile_2_old.txt): the two kernels took 1.43 and 2.16 ms a step over 16,384 x 128,256 bf16
logits, 2.9 TB/s each for these bytes (the gradient there written in float8, a byte where bf16 writes
two)."""
BACKWARD_TRAFFIC = 2.0
ATTENTION_BACKWARD_FLOPS = 2.5
"""Flash attention's backward executes about 2.5x the forward FLOPs (it recomputes the scores)."""
COLLECTIVE_HBM_PASSES = 3.0
"""A ring collective reads and writes each byte of its buffer about this many times in device memory
(send, receive, reduce); overlapped with compute it takes that HBM time from the kernels it hides behind."""
COMPILED_LOSS_BEFORE_KERNELS = 1.82
"""How much longer torch.compile's kernels of the loss's chunk took than threefold's two Triton kernels:
3.23 against 1.77 ms for a chunk of llama-1b (8,371 x 128,256 bf16 logits) on one H200 (2026-12-04,
bench/step_kernels.py, docs/benchmarks.md): three passes over the logits and a division, against two."""
ADAMW_STATE_BYTES = 24.0
"""The one-pass AdamW per element: the fp32 master and both moments read and written. Besides these it
reads the gradient (4 bytes from an fp32 buffer, the compute dtype's with direct gradients), the gradient
norm reads it once more, and it writes the bf16 weight where the master is not the weight."""
OPTIMIZER_BANDWIDTH_FRACTION = 0.82
"""Fraction of HBM bandwidth the one-pass update and the gradient norm reach together: 15.8 ms a step on
one H100 for llama-1b's 1.498e9 parameters with direct gradients (30 bytes each: 0.85 of 3.35 TB/s;
bench/results/issue18-2026-12-06-s25/callB-h100/profile_2_old.txt, adamw_kernel 14.3 ms of it) and 11.9
ms on one H200 (0.79 of 4.8 TB/s; issue18-2026-12-04-s9/call2-profile_bf16_8.txt)."""
DP_OVERLAP = 0.9
"""Fraction of the last micro-batch's backward the gradient collective can hide behind."""
HOST_OPS_FORWARD = 50
"""Eager operators issued by one layer's forward (norms, projections, RoPE, attention, MLP, residuals)."""
HOST_OPS_BACKWARD = 110
"""Autograd nodes run by one layer's backward, with the gradient hooks that fill main_grad."""
STEP_OVERHEAD_S = 0.005
"""Per step: host synchronization, loss and gradient-norm all-reduces, Python."""
EAGER_BANDWIDTH_FRACTION = 0.67
"""Eager element-wise kernels (many small launches, mixed fp32/bf16 reads) reach about this fraction of the
HBM bandwidth; fitted on the validation set (plan/validation.json), where at 1.0 eager runs were predicted
~10% fast and compiled ones ~10% slow."""
COMPILED_TRAFFIC = 0.5
"""torch.compile fuses a layer's element-wise kernels (norms, RoPE, activation, residuals): the bytes they
move fall to about this fraction of the eager ones (measured on llama-1b, H100: 16 ms of element-wise time
eager at b4 against 8 ms compiled, docs/benchmarks.md's profile)."""
COMPILED_HOST_OPS = 0.4
"""A compiled layer launches fused kernels: about this fraction of the eager operators reach the host."""
FP8_HOST_OPS = 74.0
"""Host operators float8 adds to a layer's forward and backward, besides its weights' casts: the 21
`torch._scaled_mm` calls (each about three of `Hardware.host_op_us`) and the launches of the activations'
and gradients' casts. With FP8_WEIGHT_CAST_HOST_OPS, fitted to where the step waits on the host: one H100,
compiled rowwise llama-1b, seq 2048, micro-batch 1, eight a step, `bench/profile_step.py`, the layer
weights cast at every micro-batch 410.3 ms and once a step 342.9 (2026-12-06,
bench/results/issue18-2026-12-06-s30/callC), and once a step on another H100 308.4 ms (2026-12-07,
issue18-2026-12-07-s31/callC: the host's speed differs from machine to machine, so the fit sits between
the two). Least squares over the three: the predicted steps +0.3%, -5.3% and +5.3% off the measured;
without these terms -31%, -23% and -14% (the model saw no host wait there). Not scaled by
COMPILED_HOST_OPS: these calls reach the host compiled or not (uncompiled, float8 adds more, not
measured)."""
FP8_WEIGHT_CAST_HOST_OPS = 4.6
"""Host operators of one float8 weight cast (one layout of one weight), charged for the casts a
micro-batch makes (`weight_cast_share`); see FP8_HOST_OPS."""
SCORE_BYTES_FORWARD = 4.0
"""Materialized attention, per score element (b a/t s^2): the fused scale-mask-softmax reads and writes
bf16 scores."""
SCORE_BYTES_BACKWARD = 6.0
"""Its backward reads the output gradient and the saved probabilities and writes the input gradient."""
DROPOUT_SCORE_BYTES = (5.0, 5.0)
"""Attention dropout on materialized scores (forward, backward): read, write, and a one-byte mask."""
DROPOUT_BYTES_PER_H = 6.0
"""Hidden-state dropout (two per layer, fused with the bias and the residual add): the mask and the bias."""


FP8_GEMM_RATE = {"tensorwise": 1.93, "rowwise": 1.80}
"""How much faster the layers' GEMM kernels alone run in float8 than in bf16: one H200, llama-1b, seq
2048, micro-batch 8, profiled (`bench/profile_step.py`, 2026-12-04): the bf16 layers' GEMMs 135.2 ms a step
(bench/results/issue18-2026-12-04-s9/call2-profile_bf16_8.txt, the output layer's five GEMMs left out),
rowwise's float8 GEMMs 74.9 ms (issue18-2026-12-04-s7/rowwise_kernel.txt), tensorwise's 70.1 ms
(issue18-2026-12-04/call1-prof_8_tensorwise.txt). Hopper's float8 tensor cores have twice bf16's peak;
these GEMMs are too small to get all of it."""
FP8_OUTPUT_GEMM_RATE = 1.54
"""How much faster the output layer's three GEMMs run in float8 (training.fp8_output_layer): one H100,
llama-1b's output layer on a chunk of 8,368 tokens (`bench/fp8_gemm_formats.py`, 2026-12-06,
bench/results/issue18-2026-12-06-s23/gemm_formats.txt): bf16 17.93 ms; float8 11.61 ms as
threefold.model.loss runs them, the logits through cuBLAS's row-scaled kernel (4.23 ms) and both gradients
through its one-scale kernel with the column scales applied after (3.56 and 3.82 ms). All three through the
row-scaled kernel took 14.48 ms (its weight gradient, 128256 x 8368 x 2048, runs at bf16's speed)."""
FP8_CAST_BYTES = {"tensorwise": 6.0, "rowwise": 5.2}
"""HBM bytes a float8 cast moves per element of the tensor it casts (its amax read, the scaled cast's read
and write, transposed copies; `fp8_cast_elements` counts the elements), at the compiled kernels' rate.
Fitted to one H100's compiled llama-1b steps at micro-batch 8 (seq 2048, one micro-batch a step), measured
one after another on one machine, 2026-12-07 (`bench/profile_step.py`, bench/results/issue18-2026-12-07-s31/
callA): bf16 247.5 ms, rowwise 217.9, tensorwise 216.2, rowwise + float8 output layer 204.2. Each value
makes the predicted fp8/bf16 ratio the measured one: tensorwise 6.07; rowwise 5.45, and 4.92 with the
float8 output layer, so 5.2 (tests/test_planner.py holds the three within 3%). That tensorwise comes out
dearer than rowwise is the fit taking up what FP8_GEMM_RATE (measured on an H200's older step) misses, not
the casts' own traffic, which is smaller for one scale. A cast whose amax came from the kernel that wrote
the tensor would move 3 (read 2, write 1), the floor of this design. (Before: 7.5 for both, fitted to an
H200's steps of 2026-12-04; the compiled float8 step has got faster since, and 7.5 predicted call A's float8
rows 4.6-7.5% slow.)"""
EAGER_FP8_CAST_BYTES = 7.5
"""The same for uncompiled float8, whose casts are torch's separate amax, scale and cast kernels: the
value the eager pricing (`fp8_cast_time`) was checked with, one H100's eager rowwise + float8 output layer
step (docs/benchmarks.md "Eager float8 measured"). Not refitted with the compiled bytes: eager casts fuse
nothing, so they move at least as much as compiled ones."""


def fp8_cast_bytes(kernels: Kernels, recipe: str) -> float:
    """Bytes a float8 cast of `recipe` moves per element under `kernels` (compiled or eager)."""
    return FP8_CAST_BYTES[recipe] if kernels.compiled else EAGER_FP8_CAST_BYTES


def fp8_cast_time(hw: Hardware, kernels: Kernels, nbytes: float) -> float:
    """Seconds for float8 casts that move `nbytes`. Compiled, the casts are fused with the work around them
    and run at the fused kernels' rate; eager, each is torch's separate amax, scale and cast kernels, priced
    like the rest of the eager element-wise work, at EAGER_BANDWIDTH_FRACTION of HBM. Measured eager on one
    H100 (llama-1b, seq 2048, micro-batch 8, 2026-12-06, docs/benchmarks.md "Eager float8 measured"): rowwise
    + float8 output layer 341.3 ms a step against bf16's 339.4; at full bandwidth the eager casts were
    predicted 1.06x faster than bf16, at this fraction 0.99x."""
    return hw.fused_time(nbytes) if kernels.compiled else hw.memory_time(nbytes / EAGER_BANDWIDTH_FRACTION)


def fp8_cast_elements(
    n: int, inputs: list[int], shapes: list[tuple[int, int, int]], weight_share: float = 1.0
) -> tuple[float, float]:
    """(forward, backward) elements the float8 casts of one layer read for `n` tokens: forward, each
    distinct input (width in `inputs`) once, row-scaled, and each weight; backward, each input again for
    the weight gradients (scaled along the tokens, transposed), each output gradient twice (for the input
    and the weight gradient) and each weight again (scaled along its other dimension). `weight_share`:
    the weights' casts a micro-batch, 1 / m where a step of m micro-batches casts them once
    (threefold.parallel.fp8_cache), spread evenly over the step's passes."""
    weights = weight_share * sum(k * out for _, k, out in shapes)
    activations = n * sum(inputs)
    return activations + weights, activations + 2 * sum(tok * out for tok, _, out in shapes) + weights


def layer_gemm_shapes(m: ModelConfig, n: int, t: int) -> list[tuple[int, int, int]]:
    """The forward GEMMs (tokens, k, out) of one layer for `n` tokens on one of `t` tensor-parallel ranks:
    q, k, v, o, the MLP's down projection, and its up projection (gate and up for llama)."""
    f = m.ffn_hidden_size
    assert f is not None and m.num_kv_heads is not None
    h, hq = m.hidden_size, m.num_heads * m.head_dim
    hkv_local = local_kv_heads(m.num_kv_heads, t) * m.head_dim  # one replicated head when t > kv heads
    shapes = [(n, h, hq // t), (n, h, hkv_local), (n, h, hkv_local), (n, hq // t, h), (n, f // t, h)]
    return shapes + [(n, h, f // t)] * (2 if m.arch == "llama" else 1)


def layer_linear_inputs(m: ModelConfig, t: int) -> list[int]:
    """The widths of one layer's distinct linear inputs on one of `t` tensor-parallel ranks: q/k/v's, o's,
    the MLP's, its down projection's (projections of one input share it)."""
    f = m.ffn_hidden_size
    assert f is not None
    h, hq = m.hidden_size, m.num_heads * m.head_dim
    return [h, hq // t, h, f // t]


def layer_fp8_cast_elements(m: ModelConfig, n: int, t: int, weight_share: float = 1.0) -> tuple[float, float]:
    """`fp8_cast_elements` of one layer: its distinct inputs (`layer_linear_inputs`) and its GEMMs
    (`layer_gemm_shapes`)."""
    return fp8_cast_elements(n, layer_linear_inputs(m, t), layer_gemm_shapes(m, n, t), weight_share)


def layout_caches_fp8_weights(kernels: Kernels, w: Workload, lay: Layout) -> bool:
    """Whether `lay` casts the float8 layers' weights once a step (Config.caches_fp8_weights's rule)."""
    return caches_fp8_weights(
        fp8=kernels.fp8 or False, setting=kernels.fp8_weight_cache,
        num_microbatches=lay.num_microbatches(w.global_batch_size), zero=lay.parallel.zero,
    )  # fmt: skip


def weight_cast_share(kernels: Kernels, w: Workload, lay: Layout) -> float:
    """The float8 weights' casts a micro-batch: 1, or 1 / m where a step of m micro-batches casts them
    once (`layout_caches_fp8_weights`)."""
    if not layout_caches_fp8_weights(kernels, w, lay):
        return 1.0
    return 1 / lay.num_microbatches(w.global_batch_size)


@dataclass(frozen=True, kw_only=True)
class Kernels:
    """The software a step runs, where it changes the time (the hardware is `Hardware`'s business).

    The default is threefold's own eager path: flash attention (SDPA), no dropout. Validation rows of
    other systems say what they ran (Megatron-LM 2021: materialized attention scores and dropout)."""

    attention: str = "flash"
    """'flash': fused attention on the causal FLOPs (`Hardware.attention_efficiency`); 'materialized':
    two batched matmuls over the full s x s scores and a memory-bound softmax between them."""
    compiled: bool = False
    """torch.compile: element-wise traffic and host operators scaled by COMPILED_TRAFFIC/_HOST_OPS."""
    dropout: bool = False
    """Dropout on the hidden states and (materialized) attention probabilities."""
    dp_overlap: bool = True
    """The data-parallel gradient collective starts during the last backward (bucketed), and ZeRO's
    parameter all-gather runs behind the next forward (threefold, FSDP); False: both wait for the whole
    backward and the optimizer (Megatron-LM 2021)."""
    fp8: str | None = None
    """Float8 linears (training.fp8: 'tensorwise' or 'rowwise'): the layers' GEMMs take 1 / FP8_GEMM_RATE
    of their bf16 time, and their operands' casts `fp8_cast_bytes` an element."""
    fp8_output_layer: bool = False
    """With fp8: the output layer's GEMMs too (training.fp8_output_layer), at 1 / FP8_OUTPUT_GEMM_RATE of
    their bf16 time, plus its casts (`head_pass`)."""
    fp8_weight_cache: bool = True
    """With fp8: training.fp8_weight_cache. Where a layout runs several micro-batches a step on a rank
    (`caches_fp8_weights`), each layer weight (and with fp8_output_layer the output weight) is cast once
    a step, not at every micro-batch (`fp8_cast_elements`, `head_pass`), and its two float8 copies are
    kept (the memory model's buffers)."""
    loss_kernels: bool = True
    """Compiled runs: the loss's element-wise work in threefold's two Triton kernels (CE_KERNEL_READS; since
    2026-12-04, commit 0f1905c). False: torch.compile's kernels of the same math, as threefold ran before
    them, COMPILED_LOSS_BEFORE_KERNELS times as long."""
    one_pass_adamw: bool = True
    """AdamW in one pass per parameter (threefold/adamw.py's Triton kernel, what CUDA runs since 2026-12-04):
    ADAMW_STATE_BYTES and the gradient's and weight's bytes an element, at OPTIMIZER_BANDWIDTH_FRACTION of
    HBM. False: torch's fused AdamW, then a copy of the masters into the bf16 weights, for the validation
    rows measured before it."""
    direct_grads: bool = True
    """Direct gradients where the layout allows them (`Layout.direct_grads`, Config.direct_grads's rule):
    no fp32 gradient buffers, no move into them, the optimizer reading the compute-dtype gradients.
    False: the fp32 buffers on every run, as threefold had them before (commit aeaa91d), for the
    validation rows measured then (and the memory model likewise, `memory_model.worst_rank`)."""

    def __post_init__(self) -> None:
        if self.attention not in ("flash", "materialized"):
            raise ValueError(f"kernels.attention must be 'flash' or 'materialized', got {self.attention!r}")
        if self.fp8 is not None and self.fp8 not in FP8_GEMM_RATE:
            raise ValueError(f"kernels.fp8 must be one of {sorted(FP8_GEMM_RATE)} or None, got {self.fp8!r}")
        if self.fp8_output_layer and self.fp8 is None:
            raise ValueError("kernels.fp8_output_layer needs kernels.fp8 (a recipe)")


EAGER = Kernels()


@dataclass(frozen=True)
class StepTime:
    """Seconds per training step, with its parts (per GPU, slowest pipeline rank where it matters)."""

    step: float
    pipeline: float
    """m max_r C_r + (p - 1)/v mean_r C_r."""
    compute: float
    """Per step on the slowest rank: forwards, backwards, recomputation (m max_r of its compute)."""
    tp_comm: float
    """Per step: the TP collectives, and the context-parallel transfers left exposed (cp_size > 1)."""
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
    terms: dict[str, float] = field(default_factory=dict, compare=False)
    """Seconds per step of the slowest pipeline rank by term (see `TERMS`); they sum to `step`."""

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "terms"}


TERMS = {
    "gemm": "matmuls (projections, MLP, logits), forward and backward",
    "attention": "attention core (flash, or materialized scores: matmuls and softmax)",
    "elementwise": "memory-bound kernels: norms, RoPE, activation, residuals, cross-entropy, embedding",
    "fp8_cast": "float8 casts of the linears' inputs, output gradients and weights (amax, scale, copies)",
    "recompute": "recomputation in backward (full: the layer's forward; selective: the attention core)",
    "host": "GPU waiting for the host to issue kernels (small per-GPU work)",
    "grad_accumulate": "adding each micro-batch's gradients into the fp32 main_grad (none when direct)",
    "tp_comm": "tensor-parallel all-reduces (or reduce-scatter + all-gather)",
    "pp_comm": "pipeline p2p transfers (and the scatter/gather all-gather)",
    "bubble": "pipeline bubble, (p - 1)/v of one micro-batch's time (zero-bubble: the simulator's)",
    "dp_exposed": "data-parallel gradient collective not hidden by the backward, and ZeRO's all-gather",
    "optimizer": "AdamW step, memory-bound over the rank's parameter shard",
    "overhead": "per-step fixed cost (host sync, loss and norm all-reduces)",
}
"""The terms `StepTime.terms` splits a step into, with what each covers (`threefold plan --explain`)."""


@dataclass(frozen=True)
class _Pass:
    """Forward and backward seconds of one piece of the model for one micro-batch."""

    forward: float
    backward: float
    tp: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    """forward + backward seconds by TERMS key (tp included as tp_comm)."""

    def __add__(self, other: _Pass) -> _Pass:
        terms = dict(self.terms)
        for k, v in other.terms.items():
            terms[k] = terms.get(k, 0.0) + v
        return _Pass(self.forward + other.forward, self.backward + other.backward, self.tp + other.tp, terms)

    def scaled(self, k: float) -> _Pass:
        terms = {key: v * k for key, v in self.terms.items()}
        return _Pass(self.forward * k, self.backward * k, self.tp * k, terms)


def _gemms(hw: Hardware, shapes: list[tuple[int, int, int]]) -> float:
    """Seconds of the forward matmuls (n_tok, k) x (k, N): each 2 n_tok k N FLOPs."""
    return sum(hw.matmul_time(n, out, k) for n, k, out in shapes)


def _attention_core(
    hw: Hardware, kernels: Kernels, *, b: int, s: int, hq_local: int, heads_local: int
) -> tuple[float, float]:
    """(forward, backward) seconds of the attention core of one layer and micro-batch on one rank."""
    if kernels.attention == "flash":
        forward = 2.0 * b * s * s * hq_local / (hw.peak_tflops * 1e12 * hw.attention_efficiency)
        return forward, ATTENTION_BACKWARD_FLOPS * forward
    # Materialized: q k^T and p v as batched matmuls over the whole s x s square, the softmax in memory.
    scores = b * heads_local * s * s
    head_dim = hq_local // max(1, heads_local)
    bmm = b * heads_local * (hw.matmul_time(s, s, head_dim) + hw.matmul_time(s, head_dim, s))
    fwd_bytes, bwd_bytes = SCORE_BYTES_FORWARD, SCORE_BYTES_BACKWARD
    if kernels.dropout:
        fwd_bytes, bwd_bytes = fwd_bytes + DROPOUT_SCORE_BYTES[0], bwd_bytes + DROPOUT_SCORE_BYTES[1]
    forward = bmm + hw.memory_time(fwd_bytes * scores)
    return forward, 2 * bmm + hw.memory_time(bwd_bytes * scores)


def context_parallel_comm(
    w: Workload, lay: Layout, hw: Hardware, *, core: float, intra_cp: bool
) -> tuple[float, float]:
    """Exposed (forward, backward) seconds of one layer's context-parallel traffic, one micro-batch."""
    m, par = w.model, lay.parallel
    c, t, e = par.cp_size, par.tp_size, w.dtype_bytes
    if c == 1:
        return 0.0, 0.0
    assert m.num_kv_heads is not None
    tokens = lay.micro_batch_size * w.seq_len // c
    hkv_local = local_kv_heads(m.num_kv_heads, t) * m.head_dim
    if par.cp_attention == "all_to_all":
        hq_local = m.num_heads * m.head_dim // t
        moved = (c - 1) / c * e * tokens * (2 * hq_local + 2 * hkv_local)  # q, k, v in; output back
        each = hw.p2p_time(moved, intra_node=intra_cp)
        return each, each
    kv_block = 2 * e * tokens * hkv_local
    forward = (c - 1) * hw.p2p_time(kv_block, intra_node=intra_cp)
    backward = (c - 1) * hw.p2p_time(kv_block, intra_node=intra_cp) + c * hw.p2p_time(
        2 * 4 * tokens * hkv_local, intra_node=intra_cp
    )
    return max(0.0, forward - core), max(0.0, backward - ATTENTION_BACKWARD_FLOPS * core)


def layer_pass(
    w: Workload, lay: Layout, hw: Hardware, *, intra_tp: bool, kernels: Kernels = EAGER, intra_cp: bool = True
) -> _Pass:
    """One transformer layer, one micro-batch: compute (with recomputation) and its TP all-reduces."""
    m, par = w.model, lay.parallel
    b, s, e, t = lay.micro_batch_size, w.seq_len, w.dtype_bytes, par.tp_size  # the docstring's notation
    c = par.cp_size
    f = m.ffn_hidden_size
    assert f is not None and m.num_kv_heads is not None
    h, n = m.hidden_size, b * s // c  # this rank's tokens
    hq = m.num_heads * m.head_dim
    hkv_local = local_kv_heads(m.num_kv_heads, t) * m.head_dim  # one replicated head when t > kv heads
    sp = par.sequence_parallel and t > 1
    shapes = layer_gemm_shapes(m, n, t)
    gemm = _gemms(hw, shapes)
    moved = hw.fused_time if kernels.compiled else hw.memory_time
    cast_f = cast_b = 0.0
    share = weight_cast_share(kernels, w, lay)  # the layer weights' casts made this micro-batch
    if kernels.fp8 is not None:
        gemm /= FP8_GEMM_RATE[kernels.fp8]
        cast_f, cast_b = (
            fp8_cast_time(hw, kernels, fp8_cast_bytes(kernels, kernels.fp8) * k)
            for k in layer_fp8_cast_elements(m, n, t, share)
        )
    # Load-balanced context parallelism: every rank does 1/c of the sequence's causal attention work.
    core_f, core_b = _attention_core(hw, kernels, b=b, s=s, hq_local=hq // t, heads_local=m.num_heads // t)
    core_f, core_b = core_f / c, core_b / c
    cp_forward, cp_backward = context_parallel_comm(w, lay, hw, core=core_f, intra_cp=intra_cp)
    replicated = n / (t if sp else 1) * h
    if m.arch == "llama":
        traffic = LLAMA_BYTES_PER_H * replicated + ROPE_BYTES_PER_QK * n * (hq / t + hkv_local)
        traffic += 2 * e * n * (hq / t + hkv_local)  # repeat k and v to the query heads
    else:
        traffic = GPT2_BYTES_PER_H * replicated
    if kernels.dropout:
        traffic += DROPOUT_BYTES_PER_H * replicated
    traffic += MLP_BYTES_PER_F * n * f / t
    traffic *= COMPILED_TRAFFIC if kernels.compiled else 1 / EAGER_BANDWIDTH_FRACTION
    elementwise = moved(traffic)
    all_reduce = hw.all_reduce_time(e * n * h, t, intra_node=intra_tp)
    forward = gemm + core_f + elementwise + cast_f
    backward = 2 * gemm + core_b + BACKWARD_TRAFFIC * elementwise + cast_b
    num_all_reduce = 4 if t > 1 else 0
    host_ops: float = HOST_OPS_FORWARD + HOST_OPS_BACKWARD
    recompute = 0.0
    if lay.recompute == "full":
        recompute = forward
        num_all_reduce += 2 if t > 1 else 0
        host_ops += HOST_OPS_FORWARD
    elif lay.recompute == "selective":
        recompute = core_f
        host_ops += 5
    if kernels.compiled:
        host_ops = int(host_ops * COMPILED_HOST_OPS)
    if kernels.fp8 is not None:
        host_ops += FP8_HOST_OPS + FP8_WEIGHT_CAST_HOST_OPS * 2 * len(shapes) * share
    tp_time = num_all_reduce * all_reduce + cp_forward + cp_backward
    if lay.recompute in ("full", "selective"):
        tp_time += cp_forward  # the recomputed core passes its blocks around the ring again
    # The host issues work asynchronously; when the GPU's share of a layer is small it waits for the host.
    host = (host_ops * hw.host_op_us + num_all_reduce * hw.collective_host_us) * 1e-6
    slack = max(0.0, host - (forward + backward + recompute + tp_time))
    terms = {
        "gemm": 3 * gemm,
        "attention": core_f + core_b,
        "elementwise": (1 + BACKWARD_TRAFFIC) * elementwise,
        "fp8_cast": cast_f + cast_b,
        "recompute": recompute,
        "host": slack,
        "tp_comm": tp_time,
    }
    return _Pass(forward, backward + recompute + slack, tp_time, terms)


def head_pass(w: Workload, lay: Layout, hw: Hardware, *, intra_tp: bool, kernels: Kernels = EAGER) -> _Pass:
    """Final norm, logits GEMM and cross-entropy over V_p/t columns, for one micro-batch. With the output
    layer in float8 its GEMMs run at FP8_OUTPUT_GEMM_RATE, and its casts move FP8_CAST_BYTES for each of
    the weight's two casts and one byte more a logit (the gradient's transposed copy reads and writes a
    byte, its kernel writes one byte where bf16 wrote two)."""
    t, e = lay.parallel.tp_size, w.dtype_bytes
    h, n, vloc = (
        w.model.hidden_size,
        lay.micro_batch_size * w.seq_len // lay.parallel.cp_size,
        local_vocab_size(w.model.vocab_size, t),
    )
    gemm = _gemms(hw, [(n, h, vloc)])
    moved = hw.fused_time if kernels.compiled else hw.memory_time
    cast_f = cast_b = 0.0
    if kernels.fp8_output_layer:  # needs kernels.fp8 (Kernels checks)
        gemm /= FP8_OUTPUT_GEMM_RATE
        share = weight_cast_share(kernels, w, lay)  # the weight's two casts, once a step where kept
        cast_f = fp8_cast_time(hw, kernels, share * fp8_cast_bytes(kernels, "rowwise") * vloc * h)
        cast_b = cast_f + fp8_cast_time(hw, kernels, n * vloc)
    norm = moved(LLAMA_BYTES_PER_H / 2 * n * h)
    ce_bytes = (CE_FORWARD_BYTES, CE_BACKWARD_BYTES)
    if kernels.compiled:
        slower = 1.0 if kernels.loss_kernels else COMPILED_LOSS_BEFORE_KERNELS
        ce_bytes = (slower * e * CE_KERNEL_READS[0], slower * e * CE_KERNEL_READS[1])
    ce_f, ce_b = (moved(per_logit * n * vloc) for per_logit in ce_bytes)
    forward = gemm + norm + ce_f + cast_f
    backward = 2 * gemm + 2 * norm + ce_b + cast_b
    tp_time = hw.all_reduce_time(e * n * h, t, intra_node=intra_tp) + 3 * hw.all_reduce_time(
        4 * n, t, intra_node=intra_tp
    )
    terms = {"gemm": 3 * gemm, "elementwise": 3 * norm + ce_f + ce_b, "tp_comm": tp_time}
    if cast_f:
        terms["fp8_cast"] = cast_f + cast_b
    return _Pass(forward, backward, tp_time, terms)


def embedding_pass(w: Workload, lay: Layout, hw: Hardware, *, intra_tp: bool) -> _Pass:
    """Lookup forward; the dense gradient of the V_p/t x h table in backward."""
    t, e = lay.parallel.tp_size, w.dtype_bytes
    h, n, vloc = (
        w.model.hidden_size,
        lay.micro_batch_size * w.seq_len // lay.parallel.cp_size,
        local_vocab_size(w.model.vocab_size, t),
    )
    forward = hw.memory_time(2 * e * n * h)
    backward = hw.memory_time(2 * e * vloc * h + 2 * e * n * h)
    tp_time = hw.all_reduce_time(e * n * h, t, intra_node=intra_tp)
    return _Pass(forward, backward, tp_time, {"elementwise": forward + backward, "tp_comm": tp_time})


def boundary_transfer(w: Workload, lay: Layout, hw: Hardware, *, intra_pp: bool) -> float:
    """Seconds of one pipeline boundary crossing (an activation forward or its gradient backward), on the
    critical path: the p2p transfer, and the all-gather that reassembles it under scatter/gather."""
    par = lay.parallel
    t = par.tp_size
    if par.pp_size == 1:
        return 0.0
    sp = par.sequence_parallel and t > 1
    s_ = w.seq_len // par.cp_size
    boundary = w.dtype_bytes * lay.micro_batch_size * (s_ // t if sp else s_) * w.model.hidden_size
    scatter = par.scatter_gather and t > 1 and not sp
    transfer = hw.p2p_time(boundary / t if scatter else boundary, intra_node=intra_pp)
    if scatter:
        transfer += hw.all_gather_time(boundary, t, intra_node=True)
    return transfer


def data_parallel_tail(
    lay: Layout, hw: Hardware, params: int, *, dtype_bytes: int, backward: float, intra_dp: bool,
    forward: float = 0.0, overlap: bool = True, num_microbatches: int = 1, direct: bool = False,
    one_pass: bool = True,
) -> tuple[float, float]:  # fmt: skip
    """(exposed data-parallel communication, optimizer step) seconds per step of a rank holding `params`
    parameters whose last micro-batch's backward takes `backward` seconds (and first forward `forward`:
    ZeRO-1's all-gather of the updated parameters hides behind it, layer by layer).

    ZeRO-2/3 reduce-scatter every micro-batch (the earlier ones hidden behind their backward like the
    last one's); ZeRO-3 all-gathers the parameters before every forward and backward instead of once
    after the update, prefetched behind the previous layer's compute (counted as hidden as the reduction
    is). Offload: the host AdamW (28 bytes per parameter through host memory) pipelined with the copies
    down and up, the slowest of the three setting the pace. `direct` (direct gradients, one rank): the
    gradient norm and the update each read e bytes of every gradient instead of the buffer's 4.
    `one_pass` (Kernels.one_pass_adamw): the update's bytes are the one-pass kernel's (ADAMW_STATE_BYTES
    and the gradient's and weight's), at OPTIMIZER_BANDWIDTH_FRACTION of HBM; else torch's fused AdamW
    and the copy into the weights, 44 + e bytes an element.
    """
    # every rank holding the same weights
    d, e, stage = lay.parallel.dp_size * lay.parallel.cp_size, dtype_bytes, int(lay.parallel.zero)
    grads = 4.0 * params
    grad_read = e if direct and not stage else 4  # ZeRO's shards of the reduced gradients are fp32
    weight_write = e if e < 4 else 0  # fp32 training: the master is the weight
    one_pass_bytes = (ADAMW_STATE_BYTES + 2 * grad_read + weight_write) / OPTIMIZER_BANDWIDTH_FRACTION
    per_element = one_pass_bytes if one_pass else 44 + e
    if stage and d > 1:
        rounds = num_microbatches if stage >= 2 else 1
        dp_comm = rounds * hw.reduce_scatter_time(grads, d, intra_node=intra_dp)
        gather = hw.all_gather_time(e * params, d, intra_node=intra_dp)
        if stage >= 3:
            dp_comm += 2 * num_microbatches * gather
            gather = 0.0
        opt_bytes = 4 * params + per_element * params / d
    else:
        dp_comm = hw.all_reduce_time(grads, d, intra_node=intra_dp)
        gather = 0.0
        if one_pass:
            opt_bytes = per_element * params
        else:
            opt_bytes = (48 + e) * params if e == 2 else 44 * params
            if direct:
                opt_bytes -= 2 * (4 - e) * params  # two reads of each gradient, norm and update, at e bytes
    if not overlap:
        exposed = dp_comm + gather
    else:
        last_bucket = hw.all_reduce_time(min(grads, 25 * 2**20), d, intra_node=intra_dp)
        hidden = DP_OVERLAP * backward * (num_microbatches if stage >= 2 else 1)
        exposed = max(dp_comm - hidden, min(dp_comm, last_bucket))
        if gather:
            first_bucket = hw.all_gather_time(min(e * params, 25 * 2**20), d, intra_node=intra_dp)
            exposed += max(gather - DP_OVERLAP * forward, min(gather, first_bucket))
        # A hidden collective still streams its buffers through HBM, slowing the kernels it overlaps.
        if d > 1:
            exposed += hw.memory_time(COLLECTIVE_HBM_PASSES * (grads + e * params * bool(gather)))
    optimizer = hw.memory_time(opt_bytes)
    if lay.offload:
        on_host = params / (d if stage else 1) * lay.offload_fraction
        cpu = 28 * on_host / (hw.host_adam_gbps * 1e9)
        link = 4 * on_host / (hw.host_link_gbps * 1e9)
        optimizer = optimizer * (1 - lay.offload_fraction) + max(cpu, link)
    return exposed, optimizer


def bubble_stages(
    pipeline_schedule: str, pp_size: int, num_model_chunks: int, num_microbatches: int
) -> float:
    """The bubble in units of one micro-batch's time on a rank: the paper's (p - 1) / v, and for the
    zero-bubble schedules the simulator's idle time with F = B = W (a linear layer's three GEMMs), which
    is (p - 1) / 3 for ZB-H1 and about (p - 1) / 6 for ZB-V. The idle time stops changing once the steady
    state is reached, so long steps are simulated at m = 4 p."""
    p, v, m = pp_size, num_model_chunks, num_microbatches
    if p == 1 or pipeline_schedule not in SPLIT_BACKWARD:
        return (p - 1) / v
    from threefold.pipeline.sim import simulate_named  # cached on the capped m

    r = simulate_named(pipeline_schedule, p, v, min(m, 4 * p))
    return (r.makespan - r.ideal) / (3 * v)


def estimate_layout_time(
    w: Workload, lay: Layout, hw: Hardware, *, gpus_per_node: int, kernels: Kernels = EAGER
) -> StepTime:
    """Step time of `lay` for workload `w` (see the module docstring for every term)."""
    m, e, s, par = w.model, w.dtype_bytes, w.seq_len, lay.parallel
    p, v = par.pp_size, par.num_model_chunks
    n_gpus = lay.num_gpus
    num_mb = lay.num_microbatches(w.global_batch_size)
    intra_tp = par.tp_size <= gpus_per_node
    intra_cp = par.tp_size * par.cp_size <= gpus_per_node
    intra_dp = par.tp_size * par.cp_size * par.dp_size <= gpus_per_node
    layer = layer_pass(w, lay, hw, intra_tp=intra_tp, kernels=kernels, intra_cp=intra_cp)
    head = head_pass(w, lay, hw, intra_tp=intra_tp, kernels=kernels)
    embed = embedding_pass(w, lay, hw, intra_tp=intra_tp)
    transfer = boundary_transfer(w, lay, hw, intra_pp=n_gpus <= gpus_per_node)

    ranges = layer_ranges(w, par)
    last = len(ranges) - 1
    direct = kernels.direct_grads and lay.direct_grads(w.global_batch_size)
    per_rank, compute_rank, tp_rank, pp_rank_time, dp_tail, works = [], [], [], [], [], []
    for pp_rank in range(p):
        work = _Pass(0.0, 0.0)
        for c in chunks_of_rank(pp_rank, p, v, par.pipeline_schedule in V_SHAPED):
            work = work + layer.scaled(ranges[c][1] - ranges[c][0])
            if c == 0:
                work = work + embed
            if c == last:
                work = work + head
        params = rank_parameters(w, lay, pp_rank)
        # .grad into the fp32 main_grad, every micro-batch; direct gradients stay where autograd left them
        accumulate = 0.0 if direct else hw.memory_time((8 + e) * params)
        p2p = 2 * v * transfer
        work = work + _Pass(0.0, 0.0, 0.0, {"grad_accumulate": accumulate, "pp_comm": p2p})
        compute = work.forward + work.backward + accumulate
        per_rank.append(compute + work.tp + p2p)
        compute_rank.append(compute)
        tp_rank.append(work.tp)
        pp_rank_time.append(p2p)
        works.append(work)
        # Data parallelism and the optimizer, once per step.
        dp_tail.append(
            data_parallel_tail(
                lay,
                hw,
                params,
                dtype_bytes=e,
                backward=work.backward,
                intra_dp=intra_dp,
                forward=work.forward,
                overlap=kernels.dp_overlap,
                num_microbatches=num_mb,
                direct=direct,
                one_pass=kernels.one_pass_adamw,
            )  # fmt: skip
        )

    slowest = max(range(p), key=lambda r: per_rank[r])
    mean = sum(per_rank) / p
    bubble = bubble_stages(par.pipeline_schedule, p, v, num_mb) * mean
    pipeline = num_mb * per_rank[slowest] + bubble
    dp_exposed, optimizer = max(dp_tail, key=lambda x: x[0] + x[1])
    step = pipeline + dp_exposed + optimizer + STEP_OVERHEAD_S
    tokens = w.global_batch_size * s / (step * n_gpus)
    tflops = tokens * flops_per_token(m, s) / 1e12
    terms = {k: num_mb * works[slowest].terms.get(k, 0.0) for k in TERMS}
    terms.update(bubble=bubble, dp_exposed=dp_exposed, optimizer=optimizer, overhead=STEP_OVERHEAD_S)
    return StepTime(
        step=step,
        pipeline=pipeline,
        compute=num_mb * compute_rank[slowest],
        tp_comm=num_mb * tp_rank[slowest],
        pp_comm=num_mb * pp_rank_time[slowest],
        dp_exposed=dp_exposed,
        optimizer=optimizer,
        bubble=bubble,
        bubble_fraction=bubble_stages(par.pipeline_schedule, p, v, num_mb) / num_mb,
        tokens_per_s_per_gpu=tokens,
        tflops_per_gpu=tflops,
        mfu=tflops / hw.peak_tflops,
        terms=terms,
    )


def estimate_step_time(
    config: Config, hardware: Hardware, *, gpus_per_node: int | None = None, kernels: Kernels | None = None
) -> StepTime:
    """Predicted step time of `config`'s layout on `hardware` (gpus_per_node: default all in one node;
    kernels: default threefold's, compiled and float8 as config.training says)."""
    workload, layout = from_config(config)
    t = config.training
    fp8 = getattr(t, "fp8", None) or None
    kernels = kernels or Kernels(
        compiled=bool(getattr(t, "compile", False)),
        fp8=fp8,
        fp8_output_layer=fp8 is not None and bool(getattr(t, "fp8_output_layer", False)),
        fp8_weight_cache=bool(getattr(t, "fp8_weight_cache", True)),
    )
    return estimate_layout_time(
        workload, layout, hardware, gpus_per_node=gpus_per_node or layout.num_gpus, kernels=kernels
    )
