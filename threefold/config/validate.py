"""Validation: each section checks itself, then the rules that cross sections, the world size and
the paths a run reads."""

from __future__ import annotations

from pathlib import Path

from threefold.config.sections import (
    SECTIONS,
    CheckpointConfig,
    Config,
)
from threefold.files import inside
from threefold.pipeline.schedules import check_schedule_args

# --- Validation: each section, then what crosses sections -------------------------------------------


def validate(config: Config, world_size: int | None = None, *, check_paths: bool = True) -> None:
    """Reject impossible settings with a ValueError that names every factor."""
    for section in SECTIONS:
        getattr(config, section).check()
    check_across_sections(config)
    if world_size is not None:
        check_world_size(config, world_size)
    if check_paths:
        _check_paths(config)


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
    if t.eval_batches % p.dp_size:
        raise ValueError(
            f"training.eval_batches ({t.eval_batches}) must be divisible by parallel.dp_size ({p.dp_size})"
        )
    if p.pp_size > m.num_layers:
        raise ValueError(f"parallel.pp_size ({p.pp_size}) exceeds model.num_layers ({m.num_layers})")
    if p.pp_size * p.num_model_chunks > m.num_layers:
        raise ValueError(
            f"parallel.pp_size ({p.pp_size}) * parallel.num_model_chunks ({p.num_model_chunks}) "
            f"exceeds model.num_layers ({m.num_layers})"
        )
    if p.pipeline_schedule == "zb-v" and m.tie_embeddings and p.pp_size > 1:
        raise ValueError(
            f"parallel.pipeline_schedule = 'zb-v' places the embedding and the output layer on the same rank "
            f"(pp_size = {p.pp_size}), which does not support model.tie_embeddings = true yet; use zb-h1 "
            "or untie the embeddings"
        )
    try:
        check_schedule_args(p.pipeline_schedule, p.pp_size, p.num_model_chunks, config.num_microbatches)
    except ValueError as e:
        raise ValueError(f"parallel.pipeline_schedule = {p.pipeline_schedule!r}: {e}") from None


def _check_paths(config: Config) -> None:
    """The files a run reads must exist (skipped for configs checked away from the data)."""
    data = config.data
    _check_load(config.checkpoint)
    if not (Path(data.path) / "meta.json").is_file() and not data.prepare_shakespeare:
        raise ValueError(
            f"data.path {data.path!r} holds no prepared dataset (no meta.json); "
            "run `threefold data prepare` first or set data.prepare_shakespeare = true"
        )


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
            f"world size ({world_size}) must equal parallel.tp_size ({p.tp_size}) * parallel.pp_size "
            f"({p.pp_size}) * parallel.dp_size ({p.dp_size}) = {config.world_size}"
        )
