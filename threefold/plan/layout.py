"""What the planner varies (a `Layout`) and what it holds fixed (a `Workload`), and their link to Config.

Notation (SYSTEM.md): n GPUs, t tensor-, p pipeline-, d data-parallel sizes (n = t p d), v model chunks
per pipeline rank, b micro-batch size, B global batch, m = B / (d b) micro-batches per step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from threefold.config import Config, ModelConfig, ParallelConfig

BYTES = {"float32": 4, "bfloat16": 2}


def config_supports_zero() -> bool:
    """Whether this version of the config has `parallel.zero` (the distributed optimizer)."""
    return "zero" in {f.name for f in dataclasses.fields(ParallelConfig)}


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One point of the search: how the ranks split the model and the batch."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    v: int = 1
    """Model chunks per pipeline rank (interleaved schedule when > 1)."""
    micro_batch_size: int = 1
    schedule: str = "1f1b"
    recompute: str = "none"
    zero: bool = False
    """ZeRO-1: fp32 masters and Adam moments sharded over the d data-parallel ranks."""
    sequence_parallel: bool = False
    scatter_gather: bool = True

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def num_microbatches(self, global_batch_size: int) -> int:
        """m = B / (d b)."""
        return global_batch_size // (self.dp * self.micro_batch_size)

    def overrides(self) -> list[str]:
        """The `--section.key=value` arguments that run this layout with `threefold train` or `bench`."""
        out = [
            f"--parallel.tp_size={self.tp}",
            f"--parallel.pp_size={self.pp}",
            f"--parallel.dp_size={self.dp}",
            f"--parallel.num_model_chunks={self.v}",
            f"--parallel.pipeline_schedule={self.schedule}",
            f"--training.micro_batch_size={self.micro_batch_size}",
            f"--training.recompute={self.recompute}",
        ]
        if self.sequence_parallel:
            out.append("--parallel.sequence_parallel=true")
        if self.zero or config_supports_zero():
            out.append(f"--parallel.zero={'true' if self.zero else 'false'}")
        return out

    def label(self) -> str:
        """Short name, e.g. 't2 p2 v2 d1 b1 interleaved' plus the options that are on."""
        parts = [f"t{self.tp} p{self.pp} d{self.dp}"]
        if self.v > 1:
            parts.append(f"v{self.v}")
        parts.append(f"b{self.micro_batch_size}")
        if self.pp > 1:
            parts.append(self.schedule)
        if self.recompute != "none":
            parts.append(f"rc={self.recompute}")
        if self.zero:
            parts.append("zero")
        if self.sequence_parallel:
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
    p, t = config.parallel, config.training
    workload = Workload(
        model=config.model,
        seq_len=config.data.seq_len,
        global_batch_size=t.global_batch_size,
        dtype=t.dtype,
    )
    layout = Layout(
        tp=p.tp_size,
        pp=p.pp_size,
        dp=p.dp_size,
        v=p.num_model_chunks,
        micro_batch_size=t.micro_batch_size,
        schedule=p.pipeline_schedule,
        recompute=t.recompute,
        zero=bool(getattr(p, "zero", False)),
        sequence_parallel=p.sequence_parallel,
        scatter_gather=p.scatter_gather,
    )
    return workload, layout
