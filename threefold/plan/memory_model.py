"""Memory per GPU of a training layout, term by term, from the model's shape alone (no hardware).

Notation: t, p, d tensor/pipeline/data-parallel sizes; v chunks per pipeline rank; b micro-batch size;
m micro-batches per step; s sequence length (s_ = s/t under sequence parallelism, else s); h hidden size;
a query heads, k kv heads, d_h head dim (a d_h = h_q, k d_h = h_kv); f MLP width; V vocabulary, padded to
V_p (a multiple of t); l layers; e bytes per element of the compute dtype (2 for bf16, 4 for fp32);
P_r parameters held by pipeline rank r (its share of every tensor-parallel matrix); c context-parallel
size: every per-token term below counts the rank's s/c tokens (ring attention keeps what flash attention
keeps: q, k, v, output, LSE of the local tokens), and ZeRO-1 shards over d c ranks.

Static state of rank r (bytes):
    parameters  e * P_r
    gradients   4 * P_r                  fp32 `main_grad` buckets, whatever the dtype
                e * P_r                  direct gradients (`Layout.direct_grads`, Config.direct_grads's rule:
                                         one GPU, one micro-batch a step, no optimizer offload): no buffers,
                                         the optimizer reads autograd's compute-dtype `.grad`
    optimizer   12 * P_r   (bf16: fp32 master + two fp32 Adam moments)
                 8 * P_r   (fp32: the parameter is its own master)
                divided by d under ZeRO-1 (parallel.zero), which shards masters and moments over d
ZeRO-2 keeps 4 P_r / d of gradients plus the two buckets a backward has in hand (one filling, one
reducing; dp_bucket_mb each, or a matrix larger than that, one of them the vocabulary's). ZeRO-3 also
keeps e P_r / d of parameters plus two whole units (the one computing and the one prefetched; a unit is
a layer, the embedding or the head), and its gradients' two buckets are two units. optimizer.offload
moves offload_fraction of the optimizer term to the host, where each parameter updated there takes 12
bytes (fp32 master, two moments; fp32 weights still keep theirs on the GPU): `host`, not in the GPU total.

Activations: what autograd keeps for backward, counted from what threefold.model.transformer saves (tests/
test_planner.py checks every term against the real tensors, and the per-layer formula is the sum of):
    llama norm          (4 + e) b s_ h + e b s h     fp32 copy of x and normalized y; the linear input
    gpt2 norm            e b s_ h + e b s h          LayerNorm input; the linear input
                        (sequence parallel: the gathered input, one copy shared by the projections)
    attention, none      e b s (2 h_q + 2 h_kv) / t + 4 b a s / t   q, k, v, output; LSE
                        (t > k: each rank holds one kv head, so h_kv / t reads d_h)
                        (k and v repeated to a heads, 4 e b s h_q / t, where flash attention does not
                        read grouped heads in place: fp32, or on the CPU; `kv_repeated`)
    attention, selective e b s (2 h_q + 2 h_kv) / t        q, k, v before the core, its output
    MLP                  4 e b s f / t (SwiGLU: gate, up, silu(gate), product) or 2 e b s f / t (GeLU)
    full recomputation   e b s_ h per layer (its input only)
A pipeline stage's received input (e b s_ h) is kept too, unless its first layer saves it anyway.
The last stage adds the final norm and the head and loss (`head_loss_activation`, the one place to adjust
when the loss implementation changes): threefold.model.loss computes the loss and both gradients in the
forward pass, chunk by chunk, and keeps only the input gradient and the output weight's gradient.

Micro-batches in flight on pipeline rank r (`in_flight`, in chunk-micro-batches, checked against
threefold.pipeline.sim): GPipe m v; 1F1B min(p - r, m); interleaved min(2 (p - r - 1) + (v - 1) p + 1, m v)
(all m v when m = p); ZB-H1 1F1B's, ZB-V at most 2 p half-stage chunks (the simulator's peak). What a
zero-bubble W still holds after its B (the inputs and output gradients of the linear layers) is not
counted, as in the paper's measure. The peak of rank r is then
    static + in_flight * (activations of one chunk-micro-batch) + the largest transient of a backward step
Direct gradients are not held across steps: `GradSync.reset` drops them at the step's start and the
backward makes each layer's as it frees that layer's activations, so the peak holds the larger of the two,
max(activations, e P_r), not their sum (`RankMemory.direct`): all the activations as the backward starts
(the last stage's output-weight gradient, made by the loss in the forward, is counted with them), or all
the gradients as it ends and through the optimizer step, where the activations are the smaller (full
recomputation, short sequences). Measured on llama-1b, one H200, compiled, micro-batch 8 and 4: the peak
fell by 5.6 GiB at both, the whole 4 P_r of the buffers (45.3 / 33.0 GiB from 50.9 / 38.6): the bf16
gradients took none of it back.
"""

from __future__ import annotations

from dataclasses import dataclass

from threefold.config import Config, ModelConfig, ParallelConfig
from threefold.config.validate import OFFLOAD_BYTES_PER_PARAMETER, OFFLOAD_HOST_OVERHEAD_BYTES
from threefold.metrics import count_parameters, local_kv_heads, local_vocab_size
from threefold.pipeline.partition import chunk_layer_ranges, chunks_of_rank, end_layer_costs
from threefold.pipeline.schedules import SPLIT_BACKWARD, V_SHAPED
from threefold.plan.layout import Layout, Workload, from_config

WORKSPACE_BYTES = 256 * 2**20
"""Library workspaces inside the allocator (cuBLAS, attention kernels): a small constant."""


def layer_ranges(w: Workload, par: ParallelConfig) -> list[tuple[int, int]]:
    """Every chunk's [first, last) layers, as threefold.train.layer_ranges splits them."""
    m = w.model
    ends = end_layer_costs(
        par.pipeline_balance, per_layer_params=count_parameters(m)["per_layer"], hidden_size=m.hidden_size,
        vocab_size=m.vocab_size, seq_len=w.seq_len,
    )  # fmt: skip
    return chunk_layer_ranges(m.num_layers, par.pp_size, par.num_model_chunks, ends)


def rank_parameters(w: Workload, lay: Layout, pp_rank: int) -> int:
    """P_r: parameters held by one rank of pipeline rank `pp_rank` (its v chunks), from the one counter,
    threefold.metrics.count_parameters, at this layout's tensor-parallel size."""
    par = lay.parallel
    counts = count_parameters(w.model, tp_size=par.tp_size)
    ranges = layer_ranges(w, par)
    chunks = chunks_of_rank(pp_rank, par.pp_size, par.num_model_chunks, par.pipeline_schedule in V_SHAPED)
    total = sum(ranges[c][1] - ranges[c][0] for c in chunks) * counts["per_layer"]
    has_embedding = 0 in chunks
    if has_embedding:
        total += counts["input_embedding"]
    if len(ranges) - 1 in chunks:
        total += counts["final_norm"]
        # A tied output weight is the embedding's on the first stage; a later last stage holds its own copy.
        if not w.model.tie_embeddings or not has_embedding:
            total += counts["output_weight"]
    return total


def _layer_saves_input(m: ModelConfig, dtype_bytes: int, recompute: str) -> bool:
    """Whether a layer keeps its own input tensor (then a stage's received input costs nothing extra)."""
    return recompute == "full" or m.arch == "gpt2" or dtype_bytes == 4  # llama fp32: x.float() is x itself


def layer_activation_bytes(
    m: ModelConfig,
    *,
    micro_batch_size: int,
    seq_len: int,
    tp_size: int,
    dtype_bytes: int,
    recompute: str,
    sequence_parallel: bool,
    kv_repeated: bool = False,
    compiled: bool = False,
) -> float:
    """Bytes one transformer layer saves for backward, for one micro-batch (see the module docstring).

    `compiled`: under torch.compile a llama RMSNorm saves its bf16 input instead of the fp32 copy and the
    normalized output ((4 + e) -> e per element): the compiler recomputes the normalization in backward.
    Measured: llama-1b on one H200 peaks at 38.5 / 50.8 GiB compiled at b4 / b8, 4.7 / 6.3 GiB under the
    eager-counted estimate, which is 2.1 / 4.2 GiB of these norms plus the loss's smaller transient."""
    b, s, t, e = micro_batch_size, seq_len, tp_size, dtype_bytes  # the module docstring's notation
    h, f, a = m.hidden_size, m.ffn_hidden_size, m.num_heads
    assert f is not None and m.num_kv_heads is not None
    s_ = s // t if sequence_parallel else s
    if recompute == "full":
        return e * b * s_ * h
    hq = a * m.head_dim
    hkv = local_kv_heads(m.num_kv_heads, t) * m.head_dim * t  # t times a rank's: h_kv, or t d_h when t > k
    linear_inputs = 2  # the (gathered) input of the attention projections and of the MLP's
    norm_own = (4 + e) if m.arch == "llama" and not compiled else e
    norms = 2 * norm_own * b * s_ * h + linear_inputs * e * b * s * h
    mlp = (4 if m.arch == "llama" else 2) * e * b * s * f / t
    if recompute == "selective":
        attention = e * b * s * (2 * hq + 2 * hkv) / t
    else:
        kv = hq if kv_repeated or m.arch == "gpt2" else hkv
        attention = e * b * s * (2 * hq + 2 * kv) / t + 4 * b * (a // t) * s
    return norms + attention + mlp


def head_loss_activation(
    m: ModelConfig, *, micro_batch_size: int, seq_len: int, tp_size: int, dtype_bytes: int,
    sequence_parallel: bool, compiled: bool = False,
) -> tuple[float, float]:  # fmt: skip
    """(saved, transient) bytes of the final norm, the output projection and the loss, per micro-batch.

    With n = b s tokens and V_p/t local vocabulary rows, threefold.model.loss runs chunks of
    c = min(n, CHUNK_ELEMENTS / (V_p/t)) tokens. Saved until backward: the final norm's own tensors,
    the input gradient (e n h) and the output weight's gradient (e V_p/t h for one chunk, an fp32 sum
    4 V_p/t h for several). Transient while the head runs: a chunk's logits (e c V_p/t), which the
    compiled run's Triton kernels overwrite with their gradient; eager, the gradient beside them (e c V_p/t)
    and in bf16 the fp32 working copy (4 c V_p/t).
    """
    from threefold.model import CHUNK_ELEMENTS

    b, s, e = micro_batch_size, seq_len, dtype_bytes  # the module docstring's notation
    h, n = m.hidden_size, b * s
    s_ = s // tp_size if sequence_parallel else s
    vloc = local_vocab_size(m.vocab_size, tp_size)
    norm = ((4 + e) if m.arch == "llama" else e) * b * s_ * h  # the loss saves no input of its own
    chunk = max(1, min(n, CHUNK_ELEMENTS // vloc))
    weight_grad = (e if chunk >= n else 4) * vloc * h
    fp32_copy = 4 if e == 2 and not compiled else 0  # eager: logits.float() (fp32 logits are used in place)
    per_logit = e if compiled else 2 * e + fp32_copy
    return norm + e * n * h + weight_grad, per_logit * chunk * vloc


def layer_backward_transient(
    m: ModelConfig, *, micro_batch_size: int, seq_len: int, tp_size: int, dtype_bytes: int, recompute: str,
    sequence_parallel: bool,
) -> float:  # fmt: skip
    """Extra bytes while one layer runs backward: gradient buffers (three MLP-wide ones, the fp32 norm
    gradients, one weight gradient), plus the layer's own activations recomputed under `full`, or the
    attention core's (repeated k, v and the output) under `selective`."""
    b, s, t, e = micro_batch_size, seq_len, tp_size, dtype_bytes  # the module docstring's notation
    h, f = m.hidden_size, m.ffn_hidden_size
    assert f is not None
    s_ = s // t if sequence_parallel else s
    grads = 3 * e * b * s * f / t + 2 * 4 * b * s_ * h + e * h * f / t
    if recompute == "full":
        grads += layer_activation_bytes(
            m, micro_batch_size=b, seq_len=s, tp_size=t, dtype_bytes=e, recompute="none",
            sequence_parallel=sequence_parallel,
        )  # fmt: skip
    elif recompute == "selective":
        grads += 3 * e * b * s * m.num_heads * m.head_dim / t
    return grads


def in_flight(
    pipeline_schedule: str, pp_size: int, num_model_chunks: int, num_microbatches: int, pp_rank: int
) -> int:
    """Most chunk-micro-batches whose forward ran and whose backward has not, on pipeline rank `pp_rank`."""
    p, v, m = pp_size, num_model_chunks, num_microbatches  # the module docstring's notation
    if p == 1:
        return 1 if pipeline_schedule != "gpipe" else m * v
    if pipeline_schedule == "gpipe":
        return m * v
    if pipeline_schedule in SPLIT_BACKWARD:
        return _zero_bubble_in_flight(pipeline_schedule, p, min(m, 4 * p), pp_rank)
    if v == 1:
        return min(p - pp_rank, m)
    total = m * v
    if m == p:
        return total
    return min(2 * (p - pp_rank - 1) + (v - 1) * p + 1, total)


def _zero_bubble_in_flight(pipeline_schedule: str, pp_size: int, num_microbatches: int, pp_rank: int) -> int:
    """The simulator's peak of forwards awaiting their B on `pp_rank` in a zero-bubble schedule: ZB-H1 holds
    1F1B's min(p - r, m), ZB-V at most 2 p half-stage chunks on every rank (1F1B's p stages at rank 0). The
    peak is reached within the first 2 p micro-batches, so `in_flight` asks for at most 4 p (and the
    simulation's cache then holds one entry for every longer step)."""
    from threefold.pipeline.sim import simulate_named

    v = 2 if pipeline_schedule in V_SHAPED else 1
    return simulate_named(pipeline_schedule, pp_size, v, num_microbatches).peak_in_flight[pp_rank]


@dataclass(frozen=True)
class RankMemory:
    """Bytes on one GPU of pipeline rank `pp_rank`, by component."""

    pp_rank: int
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    transient: float
    buffers: float
    host: float = 0.0
    """Host (CPU) bytes of this rank's offloaded optimizer state; not in `total`, which is the GPU's."""
    direct: bool = False
    """Direct gradients (`gradients` is e P_r of autograd's own): made as the backward frees the
    activations, so `total` counts the larger of the two instead of their sum."""

    @property
    def total(self) -> float:
        held = max(self.activations, self.gradients) if self.direct else self.activations + self.gradients
        return self.parameters + held + self.optimizer + self.transient + self.buffers

    def as_dict(self) -> dict[str, float]:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "transient": self.transient,
            "buffers": self.buffers,
            "total": self.total,
        }


def memory_by_rank(
    w: Workload,
    lay: Layout,
    *,
    compiled: bool = False,
    direct_grads: bool = True,
    fp8_weights: bool = False,
    fp8_output_layer: bool = False,
) -> list[RankMemory]:
    """Every pipeline rank's peak memory (ranks of one stage are alike); `compiled`: under torch.compile;
    `direct_grads`: False counts the fp32 gradient buffers even where the layout would have direct
    gradients (threefold before them: rows of plan/validation.json measured then); `fp8_weights`: the
    layers' weights are cast to float8 once a step (Config.caches_fp8_weights), their two float8 copies
    kept in buffers (a byte a weight each; only the layers' linears are float8, norms counted too), and
    with `fp8_output_layer` the output weight's two copies on the last stage."""
    m, e, par = w.model, w.dtype_bytes, lay.parallel
    direct = direct_grads and lay.direct_grads(w.global_batch_size)
    b, s, p, v = lay.micro_batch_size, w.seq_len // par.cp_size, par.pp_size, par.num_model_chunks
    num_mb = lay.num_microbatches(w.global_batch_size)
    sp = par.sequence_parallel and par.tp_size > 1
    s_ = s // par.tp_size if sp else s
    ranges = layer_ranges(w, par)
    last_chunk = len(ranges) - 1
    per_layer = layer_activation_bytes(
        m, micro_batch_size=b, seq_len=s, tp_size=par.tp_size, dtype_bytes=e, recompute=lay.recompute,
        sequence_parallel=sp, compiled=compiled,
    )  # fmt: skip
    head_saved, head_transient = head_loss_activation(
        m, micro_batch_size=b, seq_len=s, tp_size=par.tp_size, dtype_bytes=e, sequence_parallel=sp,
        compiled=compiled,
    )  # fmt: skip
    layer_transient = layer_backward_transient(
        m, micro_batch_size=b, seq_len=s, tp_size=par.tp_size, dtype_bytes=e, recompute=lay.recompute,
        sequence_parallel=sp,
    )  # fmt: skip
    input_bytes = 0 if _layer_saves_input(m, e, lay.recompute) else e * b * s_ * m.hidden_size
    optimizer_bytes = 12 if e == 2 else 8
    rope_cache = 2 * 4 * max(m.max_seq_len, w.seq_len) * m.head_dim if m.arch == "llama" else 0
    counts = count_parameters(m, tp_size=par.tp_size)
    unit = max(counts["per_layer"], counts["input_embedding"], counts["output_weight"] + counts["final_norm"])
    stage, d = int(par.zero), par.dp_size * par.cp_size  # ZeRO shards over every rank holding the weights
    out = []
    for pp_rank in range(p):
        chunks = chunks_of_rank(pp_rank, p, v, par.pipeline_schedule in V_SHAPED)
        params = rank_parameters(w, lay, pp_rank)
        updated = params / (d if stage else 1)  # what this rank's optimizer updates
        parameters = e * params if stage < 3 else e * (params / d + min(2 * unit, params))
        if direct:
            gradients = float(e * params)  # autograd's .grad, no fp32 buffers (one rank: nothing to shard)
        elif stage < 2:
            gradients = 4.0 * params
        else:
            # A bucket holds one tensor at least: a matrix larger than dp_bucket_mb makes its own. The two
            # vocabulary matrices sit at the two ends of the backward, never in hand together.
            bucket = par.dp_bucket_mb * 2**20 / 4
            layer_matrix = m.hidden_size * (m.ffn_hidden_size or 0) / par.tp_size
            in_hand = 2 * unit if stage == 3 else max(bucket, counts["output_weight"], layer_matrix)
            in_hand += 0 if stage == 3 else max(bucket, layer_matrix)
            in_hand = min(in_hand, params)
            gradients = 4.0 * (params / d + in_hand)
        # One chunk-micro-batch, averaged over the rank's chunks (they differ by a layer at most).
        per_chunk = [
            (ranges[c][1] - ranges[c][0]) * per_layer + (input_bytes if c > 0 else 0) for c in chunks
        ]
        activations = in_flight(par.pipeline_schedule, p, v, num_mb, pp_rank) * sum(per_chunk) / v
        transient = layer_transient
        if last_chunk in chunks:
            activations += head_saved  # one micro-batch of the last chunk is in flight at a time (1F1B)
            transient = max(transient, head_transient)
            if par.pipeline_schedule == "gpipe":
                activations += (num_mb - 1) * head_saved
        buffers = WORKSPACE_BYTES + v * rope_cache + (2 * e * b * s_ * m.hidden_size if p > 1 else 0)
        if fp8_weights:
            buffers += 2 * counts["per_layer"] * sum(ranges[c][1] - ranges[c][0] for c in chunks)
            buffers += 2 * counts["output_weight"] if fp8_output_layer and last_chunk in chunks else 0
        out.append(
            RankMemory(
                pp_rank=pp_rank,
                parameters=parameters,
                gradients=gradients,
                optimizer=optimizer_bytes * updated * (1 - lay.offload_fraction if lay.offload else 1),
                activations=activations,
                transient=transient,
                buffers=buffers,
                host=OFFLOAD_BYTES_PER_PARAMETER * updated * lay.offload_fraction if lay.offload else 0.0,
                direct=direct,
            )
        )
    return out


def worst_rank(w: Workload, lay: Layout, **options: bool) -> RankMemory:
    """The most loaded rank of `memory_by_rank(w, lay, **options)`."""
    return max(memory_by_rank(w, lay, **options), key=lambda r: r.total)


def estimate_memory(config: Config) -> dict[str, float]:
    """Peak bytes per GPU on the most loaded rank of `config`'s layout, by component, with a "total".

    Keys: parameters, gradients, optimizer, activations (saved for backward, all in-flight micro-batches),
    transient (the largest short-lived buffer set of a backward step), buffers (workspaces, RoPE tables,
    pipeline receive buffers), total: their sum, but with direct gradients (config.direct_grads) the larger
    of gradients and activations in place of both. Hardware independent; compare "total" with
    torch.cuda.max_memory_allocated().
    """
    workload, layout = from_config(config)
    t = config.training
    return worst_rank(
        workload, layout, compiled=t.compile, fp8_weights=config.caches_fp8_weights,
        fp8_output_layer=t.fp8_output_layer,
    ).as_dict()  # fmt: skip


def estimate_host_memory(config: Config) -> float:
    """Host bytes per rank of `config`'s optimizer offload (0 without it), on the most loaded rank: its
    optimizer state, and on a GPU the runtime's share (OFFLOAD_HOST_OVERHEAD_BYTES)."""
    workload, layout = from_config(config)
    state = worst_rank(workload, layout).host
    on_gpu = config.training.device != "cpu"
    return state + (OFFLOAD_HOST_OVERHEAD_BYTES if state and on_gpu else 0.0)
