"""What the planner varies (a `Layout`) and what it holds fixed (a `Workload`), and their link to Config.

A layout speaks the config's vocabulary: it is a `ParallelConfig` (tp_size, pp_size, dp_size,
num_model_chunks, pipeline_schedule, zero, sequence_parallel, scatter_gather) plus the two training
settings the planner also varies, micro_batch_size and recompute. `apply` turns it into a Config;
`overrides` gives the same settings as `--section.key=value` arguments for the workers a launcher starts.

Notation (SYSTEM.md), used in the models' formulas: n GPUs, t tensor-, p pipeline-, d data-parallel sizes
(n = t p d), v model chunks per pipeline rank, b micro-batch size, B global batch, m = B / (d b)
micro-batches per step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from threefold.config import Config, ModelConfig, ParallelConfig, has_direct_grads, validate

BYTES = {"float32": 4, "bfloat16": 2}

TRAINING_FIELDS = ("micro_batch_size", "recompute")
"""The layout's settings that live in Config.training; every other one is a ParallelConfig field."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One point of the search: how the ranks split the model and the batch."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The rank layout, field for field as Config.parallel holds it."""
    micro_batch_size: int = 1
    """Sequences per forward/backward b (Config.training.micro_batch_size)."""
    recompute: str = "none"
    """Activation recomputation: 'none', 'selective' or 'full' (Config.training.recompute)."""
    offload: bool = False
    """Optimizer state in host memory (Config.optimizer.offload)."""
    offload_fraction: float = 1.0
    """The share of it on the host (Config.optimizer.offload_fraction)."""

    @property
    def num_gpus(self) -> int:
        p = self.parallel
        return p.tp_size * p.cp_size * p.pp_size * p.dp_size

    def num_microbatches(self, global_batch_size: int) -> int:
        """m = B / (d b)."""
        return global_batch_size // (self.parallel.dp_size * self.micro_batch_size)

    def direct_grads(self, global_batch_size: int) -> bool:
        """Whether a run of this layout keeps no fp32 gradient buffers (Config.direct_grads's rule): one
        GPU, one micro-batch a step, the optimizer on the device, no ZeRO stage. The optimizer then reads
        autograd's compute-dtype gradients (e bytes a parameter), and nothing moves them into fp32."""
        return has_direct_grads(
            world_size=self.num_gpus, num_microbatches=self.num_microbatches(global_batch_size),
            offload=self.offload, zero=self.parallel.zero,
        )  # fmt: skip

    def get(self, name: str) -> Any:
        """A setting by its Config field name: micro_batch_size, recompute or a ParallelConfig field."""
        return getattr(self if name in TRAINING_FIELDS else self.parallel, name)

    def settings(self) -> list[tuple[str, str, Any]]:
        """(section, key, value) of each Config field this layout sets, for `apply` and `overrides`.

        sequence_parallel only when on: the search never turns it on, so a config that asks for it keeps
        it. scatter_gather, overlap_tp_comm and dp_bucket_mb are left as the config has them."""
        p = self.parallel
        out: list[tuple[str, str, Any]] = [
            ("parallel", key, getattr(p, key))
            for key in ("tp_size", "pp_size", "dp_size", "num_model_chunks", "pipeline_schedule")
        ]
        out += [("training", key, getattr(self, key)) for key in TRAINING_FIELDS]
        if p.sequence_parallel:
            out.append(("parallel", "sequence_parallel", True))
        if p.cp_size > 1:
            out += [("parallel", "cp_size", p.cp_size), ("parallel", "cp_attention", p.cp_attention)]
        # Stages 0 and 1 as false/true: what configs written before stages 2-3 existed say.
        out.append(("parallel", "zero", bool(p.zero) if p.zero in (0, 1) else p.zero))
        if self.offload:
            out.append(("optimizer", "offload", True))
        return out

    def apply(self, config: Config) -> Config:
        """`config` with this layout's settings (a new Config; `config` is not changed), validated."""
        sections: dict[str, dict[str, Any]] = {}
        for section, key, value in self.settings():
            sections.setdefault(section, {})[key] = value
        changed = {s: dataclasses.replace(getattr(config, s), **kv) for s, kv in sections.items()}
        out = dataclasses.replace(config, **changed)
        validate(out, check_paths=False)
        return out

    def overrides(self) -> list[str]:
        """The `--section.key=value` arguments that run this layout with `threefold train` or `bench`."""
        text = {True: "true", False: "false"}
        return [
            f"--{section}.{key}={text[value] if isinstance(value, bool) else value}"
            for section, key, value in self.settings()
        ]

    def label(self) -> str:
        """Short name, e.g. 't2 p2 d1 v2 b1 interleaved' plus the options that are on."""
        p = self.parallel
        parts = [f"t{p.tp_size} p{p.pp_size} d{p.dp_size}" + (f" c{p.cp_size}" if p.cp_size > 1 else "")]
        if p.num_model_chunks > 1:
            parts.append(f"v{p.num_model_chunks}")
        parts.append(f"b{self.micro_batch_size}")
        if p.pp_size > 1:
            parts.append(p.pipeline_schedule)
            if p.pipeline_balance != "layers":
                parts.append(f"balance={p.pipeline_balance}")
        if self.recompute != "none":
            parts.append(f"rc={self.recompute}")
        if p.zero:
            parts.append("zero" if p.zero == 1 else f"zero{p.zero}")
        if self.offload:
            parts.append("offload")
        if p.sequence_parallel:
            parts.append("sp")
        return " ".join(parts)


@dataclass(frozen=True, kw_only=True)
class Workload:
    """The model and batch shape a layout must train: fixed during the search."""

    model: ModelConfig
    seq_len: int
    global_batch_size: int
    dtype: str = "bfloat16"

    @property
    def dtype_bytes(self) -> int:
        """e: bytes per element of parameters and activations in the compute dtype."""
        return BYTES[self.dtype]


def from_config(config: Config) -> tuple[Workload, Layout]:
    """The workload and layout a Config describes."""
    t = config.training
    workload = Workload(
        model=config.model,
        seq_len=config.data.seq_len,
        global_batch_size=t.global_batch_size,
        dtype=t.dtype,
    )
    parallel = dataclasses.replace(config.parallel)  # a copy: the layout must not change with the config
    # 'auto' (resolved at start-up by plan.fit.resolve_offload) counts as all on the host until then.
    share = config.optimizer.offload_fraction
    share = 1.0 if share == "auto" else share
    return workload, Layout(
        parallel=parallel,
        micro_batch_size=t.micro_batch_size,
        recompute=t.recompute,
        offload=config.optimizer.offload,
        offload_fraction=share,
    )
