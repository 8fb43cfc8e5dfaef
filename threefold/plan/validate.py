"""The planner against published and measured training throughput: `threefold plan --validate`.

threefold/plan/validation.json holds the rows: a source (a paper's table, another system's published
numbers, threefold's own benchmarks), the workload, the hardware preset, the layout as far as the source
gives it, the kernels it ran (`time_model.Kernels`) and the throughput it reported. Each row is predicted
with the same time model `threefold plan` ranks layouts with; layout settings the source leaves out are
the planner's choice (its fastest layout that fits with the given ones fixed), as the source's authors
tuned theirs. The error of a row is predicted / reported - 1 on throughput (the same for tokens/s and for
FLOP/s, whose count is fixed by the workload).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from threefold.config import ModelConfig
from threefold.plan.hardware import GIB, PRESETS
from threefold.plan.layout import Layout, Workload
from threefold.plan.search import FIXABLE, Candidate, peak_memory, plan
from threefold.plan.time_model import Kernels, StepTime, estimate_layout_time
from threefold.presets import MODEL_PRESETS

VALIDATION_FILE = Path(__file__).with_name("validation.json")
LAYOUT_KEYS = (*FIXABLE, "sequence_parallel")
"""Layout fields a row may give: what the search varies, plus sequence parallelism (never searched)."""


@dataclass(frozen=True)
class Prediction:
    row: dict[str, Any]
    layout: Layout
    time: StepTime
    predicted: float
    """Throughput in the row's reported unit."""
    reported: float
    unit: str
    memory_gib: float
    """Predicted peak memory of the most loaded rank (compare with `measured_peak_gib` where a row has it)."""

    @property
    def error(self) -> float:
        return self.predicted / self.reported - 1

    @property
    def memory_error(self) -> float | None:
        """Predicted / measured peak memory - 1, or None when the row has no measured peak."""
        peak = self.row.get("measured_peak_gib")
        return None if peak is None else self.memory_gib / peak - 1


def load_rows(path: Path = VALIDATION_FILE) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(sources by key, rows) of a validation file."""
    data = json.loads(Path(path).read_text())
    return data["sources"], data["rows"]


def _model(spec: str | dict[str, Any]) -> ModelConfig:
    if isinstance(spec, str):
        return ModelConfig(preset=spec, **MODEL_PRESETS[spec])
    spec = dict(spec)
    preset = spec.pop("preset", None)
    return ModelConfig(preset=preset, **{**(MODEL_PRESETS[preset] if preset else {}), **spec})


def megatron_hardware_flops(w: Workload) -> float:
    """FLOPs of one step with full recomputation by the Megatron paper's count (SYSTEM.md):
    96 B s l h^2 (1 + s/(6h) + V/(16 l h))."""
    m, s = w.model, w.seq_len
    h, l = m.hidden_size, m.num_layers  # noqa: E741 - the paper's notation
    return 96 * w.global_batch_size * s * l * h * h * (1 + s / (6 * h) + m.vocab_size / (16 * l * h))


def _throughput(unit: str, w: Workload, step: float, num_gpus: int) -> float:
    if unit == "tokens_per_s_per_gpu":
        return w.global_batch_size * w.seq_len / step / num_gpus
    if unit == "hardware_tflops_per_gpu":
        return megatron_hardware_flops(w) / step / num_gpus / 1e12
    raise ValueError(f"unknown reported unit {unit!r}")


def predict_row(row: dict[str, Any]) -> Prediction:
    """The time model's prediction for one validation row."""
    w = Workload(
        model=_model(row["model"]),
        seq_len=row["seq_len"],
        global_batch_size=row["global_batch_size"],
        dtype=row.get("dtype", "bfloat16"),
    )
    hw = PRESETS[row["hardware"]]
    kernels = Kernels(**row.get("kernels", {}))
    given = dict(row["layout"])
    sp = given.pop("sequence_parallel", False)
    unknown = sorted(set(given) - set(LAYOUT_KEYS))
    if unknown:
        raise ValueError(f"row {row['id']}: unknown layout key(s) {unknown}")
    g = min(row["gpus_per_node"], row["num_gpus"])
    result = plan(w, hw, num_gpus=row["num_gpus"], gpus_per_node=g, fixed=given, kernels=kernels)
    candidates: list[Candidate] = result.ranked or sorted(result.too_big, key=lambda c: -c.time.step)[-1:]
    if not candidates:
        raise ValueError(f"row {row['id']}: no valid layout with {given}")
    layout = candidates[0].layout
    if sp:
        layout = dataclasses.replace(
            layout, parallel=dataclasses.replace(layout.parallel, sequence_parallel=True)
        )
    time = estimate_layout_time(w, layout, hw, gpus_per_node=g, kernels=kernels)
    (unit, reported), *_ = ((k, v) for k, v in row["reported"].items() if k != "percent_of_peak")
    memory = peak_memory(w, layout, kernels).total / GIB
    throughput = _throughput(unit, w, time.step, row["num_gpus"])
    return Prediction(row, layout, time, throughput, reported, unit, memory)


def validate(path: Path = VALIDATION_FILE) -> list[Prediction]:
    """Every row's prediction; rows marked `superseded` (measured on code since replaced) included."""
    return [predict_row(r) for r in load_rows(path)[1]]


def counted(predictions: list[Prediction]) -> list[Prediction]:
    """The rows the error is computed over: all but those measured on code since replaced."""
    return [p for p in predictions if not p.row.get("superseded")]


def summary(predictions: list[Prediction]) -> dict[str, float]:
    """Mean and largest absolute relative error over the counted rows, overall and per source."""
    predictions = counted(predictions)
    out = {"mean_abs_error": _mae(predictions), "max_abs_error": max(abs(p.error) for p in predictions)}
    for source in sorted({p.row["source"] for p in predictions}):
        out[f"mean_abs_error[{source}]"] = _mae([p for p in predictions if p.row["source"] == source])
    memory = [abs(e) for p in predictions if (e := p.memory_error) is not None]
    if memory:
        out.update(memory_rows=len(memory), memory_mean_abs_error=sum(memory) / len(memory),
                   memory_max_abs_error=max(memory))  # fmt: skip
    return out


def _mae(predictions: list[Prediction]) -> float:
    return sum(abs(p.error) for p in predictions) / len(predictions)


def format_report(predictions: list[Prediction], sources: dict[str, Any]) -> str:
    """The validation table, its error summary and the sources, as Markdown."""
    lines = [
        "| row | source | GPUs | layout (planner's where the source gives none) | unit | reported "
        "| predicted | error | peak GiB measured | predicted | error |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in predictions:
        r = p.row
        lines.append(
            f"| {r['id']} | {r['source']} | {r['num_gpus']} x {r['hardware']} | {p.layout.label()} | "
            f"{'tokens/s/GPU' if p.unit == 'tokens_per_s_per_gpu' else 'HW TFLOP/s/GPU'} | "
            f"{p.reported:,.0f} | {p.predicted:,.0f} | {p.error:+.1%}"
            f"{' (not counted)' if r.get('superseded') else ''} | "
            + (
                f"{r['measured_peak_gib']:.1f} | {p.memory_gib:.1f} | {p.memory_error:+.1%} |"
                if p.memory_error is not None
                else "| | |"
            )  # fmt: skip
        )
    s = summary(predictions)
    lines.append("")
    lines.append(
        f"{len(counted(predictions))} configurations from {len(sources)} sources: mean |error| "
        f"{s['mean_abs_error']:.1%}, largest {s['max_abs_error']:.1%}"
    )
    for key, value in s.items():
        if key.startswith("mean_abs_error["):
            lines.append(f"  {key[len('mean_abs_error[') : -1]}: mean |error| {value:.1%}")
    if "memory_rows" in s:
        lines.append(
            f"peak memory, {s['memory_rows']:.0f} measured rows: mean |error| "
            f"{s['memory_mean_abs_error']:.1%}, largest {s['memory_max_abs_error']:.1%}"
        )
    lines.append("")
    for key, src in sources.items():
        lines.append(f"[{key}] {src['cite']}. {src['url']}")
    return "\n".join(lines)
