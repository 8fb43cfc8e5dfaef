"""Validation: each section checks itself, then the rules that cross sections, the world size and
the paths a run reads."""

from __future__ import annotations

from pathlib import Path

from threefold.config.sections import (
    SECTIONS,
    Config,
)
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
    try:
        check_schedule_args(p.pipeline_schedule, p.pp_size, p.num_model_chunks, config.num_microbatches)
    except ValueError as e:
        raise ValueError(f"parallel.pipeline_schedule = {p.pipeline_schedule!r}: {e}") from None


def _check_paths(config: Config) -> None:
    """The files a run reads must exist (skipped for configs checked away from the data)."""
    load, data = config.checkpoint.load, config.data
    if load and not (Path(load) / "manifest.json").is_file():
        raise ValueError(f"checkpoint.load {load!r} is not a checkpoint (no manifest.json)")
    if not (Path(data.path) / "meta.json").is_file() and not data.prepare_shakespeare:
        raise ValueError(
            f"data.path {data.path!r} holds no prepared dataset (no meta.json); "
            "run `threefold data prepare` first or set data.prepare_shakespeare = true"
        )


def check_world_size(config: Config, world_size: int) -> None:
    p = config.parallel
    if world_size != config.world_size:
        raise ValueError(
            f"world size ({world_size}) must equal parallel.tp_size ({p.tp_size}) * parallel.pp_size "
            f"({p.pp_size}) * parallel.dp_size ({p.dp_size}) = {config.world_size}"
        )
