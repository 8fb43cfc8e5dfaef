"""Validation: each section checks itself, then the rules that cross sections, the world size and
the paths a run reads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from threefold.config.sections import (
    SECTIONS,
    CheckpointConfig,
    Config,
)
from threefold.files import inside
from threefold.pipeline.schedules import SPLIT_BACKWARD, check_schedule_args

# --- Validation: each section, then what crosses sections -------------------------------------------


def validate(config: Config, world_size: int | None = None, *, check_paths: bool = True) -> None:
    """Reject impossible settings with a ValueError that names every factor."""
    for section in SECTIONS:
        getattr(config, section).check()
    check_across_sections(config)
    if config.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            "logging.wandb = true needs the wandb package: pip install 'threefold[wandb]' "
            "(or set logging.wandb = false)"
        )
    if world_size is not None:
        check_world_size(config, world_size)
    if check_paths:
        _check_paths(config)
        check_host_memory(config)


def check_samples(config: Config) -> None:
    """Samples during training (logging.sample_every) need room for a prompt in the model's context. (Each
    prompt's length is checked at start-up, where the tokenizer is at hand.)"""
    log, m = config.logging, config.model
    if log.sample_every > 0 and log.sample_max_new_tokens >= m.max_seq_len:
        raise ValueError(
            f"logging.sample_max_new_tokens ({log.sample_max_new_tokens}) must be below model.max_seq_len "
            f"({m.max_seq_len}), leaving room for a prompt"
        )


MAX_MICROBATCHES = 1 << 16
"""Micro-batches per pipeline per step, at most. Each one is a schedule action the workers build and
hold; at micro-batch 1 and 2,048 tokens this is 134M tokens per data-parallel replica and step, far beyond
any real batch, while 2**32 would hang the workers building their schedules."""


def check_across_sections(config: Config) -> None:
    """The rules that tie one section's values to another's (each section has checked its own)."""
    m, p, d, t = config.model, config.parallel, config.data, config.training
    assert m.num_kv_heads is not None and m.ffn_hidden_size is not None  # ModelConfig.check
    tp = p.tp_size
    for name, value in (("num_heads", m.num_heads), ("ffn_hidden_size", m.ffn_hidden_size)):
        if value % tp:
            raise ValueError(f"parallel.tp_size ({tp}) must divide model.{name} ({value})")
    if m.num_kv_heads % tp and tp % m.num_kv_heads:
        # Each rank needs whole kv heads: k/t of them, or one replicated over t/k ranks.
        raise ValueError(
            f"parallel.tp_size ({tp}) must divide model.num_kv_heads ({m.num_kv_heads}) or be a multiple "
            f"of it (each kv head then replicated over tp_size / num_kv_heads ranks)"
        )
    if p.sequence_parallel and d.seq_len % tp:
        raise ValueError(
            f"with sequence parallelism, parallel.tp_size ({tp}) must divide data.seq_len ({d.seq_len})"
        )
    if t.fp8:
        _check_fp8_shapes(config)
    if t.attention_backend == "fa4" and not (8 <= m.head_dim <= 256 and m.head_dim % 8 == 0):
        raise ValueError(
            f"training.attention_backend = 'fa4' needs a head dim (model.hidden_size / model.num_heads = "
            f"{m.hidden_size} / {m.num_heads} = {m.head_dim}) between 8 and 256 and a multiple of 8"
        )
    if t.mlp_backend == "quack":
        _check_quack_mlp(config)
    check_context_parallel(config)
    if d.seq_len > m.max_seq_len:
        raise ValueError(f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    per_step = t.micro_batch_size * p.dp_size
    if t.global_batch_size % per_step:
        raise ValueError(
            f"training.global_batch_size ({t.global_batch_size}) must be divisible by "
            f"training.micro_batch_size ({t.micro_batch_size}) * parallel.dp_size ({p.dp_size}) = {per_step}"
        )
    if config.num_microbatches > MAX_MICROBATCHES:
        raise ValueError(
            f"training.global_batch_size ({t.global_batch_size}) / (training.micro_batch_size "
            f"({t.micro_batch_size}) * parallel.dp_size ({p.dp_size})) = {config.num_microbatches} "
            f"micro-batches per step, more than the {MAX_MICROBATCHES} a step can schedule; "
            "raise micro_batch_size or dp_size, or lower global_batch_size"
        )
    if t.eval_interval > 0 and t.eval_sequences < p.dp_size:
        raise ValueError(
            f"training.eval_sequences ({t.eval_sequences}) must be at least parallel.dp_size ({p.dp_size}): "
            "each data-parallel rank scores a share of them"
        )
    if p.pp_size > m.num_layers:
        raise ValueError(f"parallel.pp_size ({p.pp_size}) exceeds model.num_layers ({m.num_layers})")
    if p.pp_size * p.num_model_chunks > m.num_layers:
        raise ValueError(
            f"parallel.pp_size ({p.pp_size}) * parallel.num_model_chunks ({p.num_model_chunks}) "
            f"exceeds model.num_layers ({m.num_layers})"
        )
    if p.zero_fp8_gather and (p.zero < 3 or t.fp8 != "tensorwise"):
        raise ValueError(
            f"parallel.zero_fp8_gather needs parallel.zero = 3 and training.fp8 = 'tensorwise' (got zero = "
            f"{p.zero}, fp8 = {t.fp8!r}): it all-gathers ZeRO-3's parameter shards as float8 with one scale "
            "per tensor"
        )
    if p.zero >= 3 and t.compile:
        # A compiled layer guards on its parameters' storage, which ZeRO-3 frees and refills every use.
        raise ValueError(
            "parallel.zero = 3 cannot be combined with training.compile = true; use zero 2 or no compile"
        )
    if p.pipeline_schedule == "zb-v" and m.tie_embeddings and p.pp_size > 1:
        raise ValueError(
            f"parallel.pipeline_schedule = 'zb-v' places the embedding and the output layer on the same rank "
            f"(pp_size = {p.pp_size}), which does not support model.tie_embeddings = true yet; use zb-h1 "
            "or untie the embeddings"
        )
    check_samples(config)
    try:
        check_schedule_args(p.pipeline_schedule, p.pp_size, p.num_model_chunks, config.num_microbatches)
    except ValueError as e:
        raise ValueError(f"parallel.pipeline_schedule = {p.pipeline_schedule!r}: {e}") from None


FP8_MULTIPLE = 16
"""Float8 GEMMs (cuBLAS, CUTLASS) need every matrix dimension a multiple of 16."""


def _check_quack_mlp(config: Config) -> None:
    """training.mlp_backend = 'quack': a SwiGLU MLP whose GEMM sizes QuACK takes, weight gradients not
    deferred (its GEMMs compute them inside one autograd function)."""
    m, p = config.model, config.parallel
    if m.arch != "llama":
        raise ValueError(
            f"training.mlp_backend = 'quack' fuses SwiGLU, the llama MLP; model.arch = {m.arch!r} has a GeLU "
            "MLP: choose 'auto'"
        )
    assert m.ffn_hidden_size is not None  # ModelConfig.check
    local = m.ffn_hidden_size // p.tp_size
    if local % 8 or m.hidden_size % 8:
        raise ValueError(
            f"training.mlp_backend = 'quack' needs model.hidden_size ({m.hidden_size}) and "
            f"model.ffn_hidden_size / parallel.tp_size ({m.ffn_hidden_size} / {p.tp_size} = {local}) to be "
            "multiples of 8"
        )
    if p.pipeline_schedule in SPLIT_BACKWARD:
        raise ValueError(
            f"training.mlp_backend = 'quack' cannot defer the MLP's weight gradients as "
            f"parallel.pipeline_schedule = {p.pipeline_schedule!r} does: choose 'auto' or another schedule"
        )


def _check_fp8_shapes(config: Config) -> None:
    """Every dimension of the layers' float8 GEMMs, as each TP rank sees it, a multiple of 16."""
    m, tp, t = config.model, config.parallel.tp_size, config.training
    cp = config.parallel.cp_size
    assert m.num_kv_heads is not None and m.ffn_hidden_size is not None  # ModelConfig.check
    kv_heads = f"max(1, model.num_kv_heads ({m.num_kv_heads}) / parallel.tp_size ({tp}))"
    dims = {
        f"training.micro_batch_size ({t.micro_batch_size}) * data.seq_len ({config.data.seq_len}) / "
        f"parallel.cp_size ({cp}) tokens": t.micro_batch_size * config.data.seq_len // cp,
        "model.hidden_size": m.hidden_size,
        f"model.num_heads ({m.num_heads}) / parallel.tp_size ({tp}) * head dim ({m.head_dim})":
            m.num_heads // tp * m.head_dim,
        f"{kv_heads} * head dim ({m.head_dim})": max(1, m.num_kv_heads // tp) * m.head_dim,
        f"model.ffn_hidden_size ({m.ffn_hidden_size}) / parallel.tp_size ({tp})": m.ffn_hidden_size // tp,
    }  # fmt: skip
    if t.fp8_output_layer:
        vocab = (f"model.vocab_size ({m.vocab_size}) padded to a multiple of parallel.tp_size ({tp}), over "
                "tp_size (the output layer's local vocabulary)")  # fmt: skip
        dims[vocab] = -(-m.vocab_size // tp)
    for name, size in dims.items():
        if size % FP8_MULTIPLE:
            raise ValueError(
                f"training.fp8 = {t.fp8!r} needs every GEMM dimension to be a multiple of {FP8_MULTIPLE}; "
                f"{name} = {size} is not"
            )


def check_context_parallel(config: Config) -> None:
    """cp_size's rules: whole mirrored chunks per rank, and whole heads per rank for all-to-all."""
    m, p, d, t = config.model, config.parallel, config.data, config.training
    cp = p.cp_size
    if cp == 1:
        return
    # Each cp rank holds chunks i and 2cp-1-i of every sequence; under sequence parallelism its tp ranks
    # then split that local part again.
    if d.seq_len % (2 * cp):
        raise ValueError(
            f"data.seq_len ({d.seq_len}) must be divisible by 2 * parallel.cp_size ({cp}) = {2 * cp}: "
            "each context-parallel rank holds two mirrored chunks of every sequence"
        )
    if p.sequence_parallel and d.seq_len % (cp * p.tp_size):
        raise ValueError(
            f"with sequence parallelism, parallel.cp_size ({cp}) * parallel.tp_size ({p.tp_size}) must "
            f"divide data.seq_len ({d.seq_len})"
        )
    if d.document_masking and p.cp_attention == "ring" and t.device == "cuda":
        raise ValueError(
            f"data.document_masking (true) with parallel.cp_size ({cp}) runs the ring's blocks through exact "
            "fp32 math, which on a GPU would hold every block's scores; set parallel.cp_attention = "
            "'all_to_all' (whole sequences per head group, FlexAttention) or document_masking = false"
        )
    if p.cp_attention == "all_to_all":
        heads = m.num_heads // p.tp_size
        if heads % cp:
            raise ValueError(
                f"parallel.cp_attention = 'all_to_all' needs model.num_heads ({m.num_heads}) / "
                f"parallel.tp_size ({p.tp_size}) = {heads} heads per tp rank to be divisible by "
                f"parallel.cp_size ({cp}); use cp_attention = 'ring'"
            )
    if t.attention_backend not in ("auto", "flash", "math"):
        raise ValueError(
            f"training.attention_backend = {t.attention_backend!r} cannot run context parallelism "
            f"(parallel.cp_size = {cp}): its blocks need the log-sum-exp, which 'flash' (GPU) and 'math' "
            "return; choose 'auto', 'flash' or 'math'"
        )


OFFLOAD_BYTES_PER_PARAMETER = 12
"""Host memory of optimizer.offload per parameter a rank updates on the host: fp32 master, two moments
(gradients pass through two fixed staging buffers, threefold.offload)."""
OFFLOAD_HOST_OVERHEAD_BYTES = int(4.5 * 2**30)
"""Host memory of an offloading GPU rank beyond its optimizer state and its Python + torch baseline: the CUDA
runtime and libraries once their kernels are loaded, and the two staging buffers. Measured on one H200
(torch 2.11, llama-8b, 2026-12-03/04): the host peak exceeded 12 bytes per offloaded parameter plus the
baseline by 4.6, 4.7 and 5.1 GiB at offload shares 1.0, 0.5 and 0.36 (docs/benchmarks.md)."""


def host_memory_available() -> int | None:
    """Bytes of memory this host can still give (MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def ranks_on_this_host(config: Config) -> int:
    """How many of the run's ranks share this host: one per GPU (up to the world size), or all on CPU."""
    import torch  # only when a run is about to start

    if config.training.device != "cpu" and torch.cuda.is_available():
        return min(config.world_size, torch.cuda.device_count())
    return config.world_size


def offload_host_bytes(config: Config) -> int:
    """Host bytes optimizer.offload needs per rank: 12 per parameter the rank updates on the host (the
    largest stage's share, 1/dp of it under ZeRO, offload_fraction of that on the host)."""
    from threefold.metrics import count_parameters  # metrics imports this package

    p = config.parallel
    total = count_parameters(config.model, tp_size=p.tp_size)["total"]
    per_rank = -(-total // p.pp_size) // (p.dp_size if p.zero else 1)
    share = config.optimizer.offload_fraction
    return int(OFFLOAD_BYTES_PER_PARAMETER * per_rank * (1.0 if share == "auto" else share))


def check_host_memory(config: Config) -> None:
    """optimizer.offload: the ranks on this host must fit their optimizer state in its free memory."""
    if not config.optimizer.offload or config.optimizer.offload_fraction == "auto":
        return  # 'auto' is checked once resolved (plan.fit.check_fits)
    available = host_memory_available()
    if available is None:
        return
    ranks = ranks_on_this_host(config)
    per_rank = offload_host_bytes(config)
    overhead = OFFLOAD_HOST_OVERHEAD_BYTES if config.training.device != "cpu" else 0
    need = (per_rank + overhead) * ranks
    if need > 0.9 * available:  # the data loader, the staging buffers and the OS need the rest
        raise ValueError(
            f"optimizer.offload needs {need / 2**30:.1f} GiB of host memory (({OFFLOAD_BYTES_PER_PARAMETER} "
            f"bytes x {per_rank // OFFLOAD_BYTES_PER_PARAMETER:,} offloaded parameters + "
            f"{overhead / 2**30:.1f} GiB for the CUDA runtime) per rank x {ranks} "
            f"ranks on this host), more than 90% of the {available / 2**30:.1f} GiB available; lower "
            "optimizer.offload_fraction, or raise parallel.dp_size (with parallel.zero), tp_size or pp_size"
        )


def _check_paths(config: Config) -> None:
    """The files a run reads must exist (skipped for configs checked away from the data)."""
    data = config.data
    _check_load(config.checkpoint)
    if not data.sources:
        if not (Path(data.path) / "meta.json").is_file() and not data.prepare_shakespeare:
            raise ValueError(
                f"data.path {data.path!r} holds no prepared dataset (no meta.json); "
                "run `threefold data prepare` first or set data.prepare_shakespeare = true"
            )
        return
    for i, source in enumerate(data.sources):
        if not (Path(source.path) / "meta.json").is_file():
            raise ValueError(
                f"data.sources[{i}].path {source.path!r} holds no prepared dataset (no meta.json); "
                "run `threefold data prepare` first"
            )
    from threefold.data.blend import check_compatible  # here: it loads torch, which `plan` never needs

    check_compatible([(s.label, s.path) for s in data.sources])


def _check_load(ckpt: CheckpointConfig) -> None:
    """`checkpoint.load` names one readable checkpoint, outside `checkpoint.dir`; a run whose `dir` holds
    checkpoints already resumes from those and never reads `load` (it may have been deleted since)."""
    if not ckpt.load:
        return
    if ckpt.dir and _within(Path(ckpt.load), Path(ckpt.dir)):
        raise ValueError(
            f"checkpoint.load {ckpt.load!r} lies in this run's own checkpoint.dir {ckpt.dir!r}, whose "
            "newest checkpoint the run resumes from by itself. To go back to an older step, branch the "
            f"run: a new checkpoint.dir (and logging.out_dir), with load = {ckpt.dir!r} and load_step = N"
        )
    if not (ckpt.dir and step_directories(ckpt.dir)):
        checkpoint_to_load(ckpt)


def _within(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def step_directories(root: str | Path) -> dict[int, Path]:
    """The `step_<N>` directories of a run's checkpoint directory, by N (none when it does not exist)."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {int(d.name[5:]): d for d in root.glob("step_*") if d.name[5:].isdigit() and d.is_dir()}


def checkpoint_to_load(ckpt: CheckpointConfig) -> Path:
    """The one checkpoint `checkpoint.load` (with `load_step`) names; ValueError naming what is there.

    `load` is a checkpoint (it holds manifest.json: a `step_<N>`, an import, a conversion), or a run's
    checkpoint directory: then its `step_<load_step>`, or without load_step the step its `latest` names
    (the highest step when `latest` is gone). A damaged checkpoint is refused, not skipped: the user
    named this one.
    """
    root, step = Path(ckpt.load), ckpt.load_step
    if (root / "manifest.json").is_file():
        if step is not None:
            raise ValueError(
                f"checkpoint.load {ckpt.load!r} is one checkpoint (it holds manifest.json), so "
                f"checkpoint.load_step ({step}) has nothing to pick from: give the run's checkpoint "
                "directory as load, or drop load_step"
            )
        return root
    steps = step_directories(root)
    if not steps:
        raise ValueError(
            f"checkpoint.load {ckpt.load!r} is neither a checkpoint (no manifest.json) nor a run's "
            "checkpoint directory (no step_<N> directories)"
        )
    if step is not None:
        if step not in steps:
            raise ValueError(
                f"checkpoint.load_step ({step}): {ckpt.load!r} holds no step_{step}; its steps are "
                f"{sorted(steps)}"
            )
        path = steps[step]
    else:
        path = _latest(root) or steps[max(steps)]
    if not (path / "manifest.json").is_file():
        raise ValueError(
            f"checkpoint {str(path)!r} (checkpoint.load) holds no manifest.json: missing or damaged"
        )
    return path


def _latest(root: Path) -> Path | None:
    """The directory `latest` names in `root` (None without one), refused if it leaves `root`."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    try:
        return inside(root, name, what="checkpoint")
    except ValueError:
        raise ValueError(
            f"{str(pointer)!r} points to {name!r}, which is not a directory inside {str(root)!r}; give "
            "checkpoint.load_step to choose a step instead"
        ) from None


def check_world_size(config: Config, world_size: int) -> None:
    p = config.parallel
    if world_size != config.world_size:
        raise ValueError(
            f"world size ({world_size}) must equal parallel.tp_size ({p.tp_size}) * parallel.cp_size "
            f"({p.cp_size}) * parallel.pp_size ({p.pp_size}) * parallel.dp_size ({p.dp_size}) = "
            f"{config.world_size}"
        )
