"""Compare `threefold bench` measurements with the planner's predictions for the same layouts.

Usage: python bench/plan_compare.py BENCH.jsonl [--plan PLAN.json] [--gpu h200] [--gpus-per-node 4]

BENCH.jsonl holds one `threefold bench` JSON line per layout (lines with an "error" key are runs that
failed). PLAN.json is `threefold plan --json` for the same model and batch with nothing fixed: its first
entry is the planner's first choice. Each measured layout is predicted exactly as `threefold plan --json`
with every dimension fixed would. Prints a markdown table, the Spearman rank correlation of predicted and
measured tokens/s/GPU, the gap between the planner's first choice and the measured best, and the memory
errors, each against the issue's acceptance threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from threefold.config import ModelConfig, ParallelConfig
from threefold.plan.cli import run_plan
from threefold.plan.hardware import load_hardware
from threefold.plan.layout import Layout, Workload
from threefold.plan.time_model import Kernels
from threefold.presets import MODEL_PRESETS

KEYS = ("tp_size", "pp_size", "dp_size", "num_model_chunks", "micro_batch_size", "pipeline_schedule",
        "recompute", "zero")  # fmt: skip
"""The settings a bench row fixes, by Config field name."""


def layout_of(row: dict[str, Any]) -> Layout:
    """The layout of a bench (or plan --json) row, whose keys are tp, pp, dp, v, schedule, ..."""
    parallel = ParallelConfig(
        tp_size=int(row["tp"]), pp_size=int(row["pp"]), dp_size=int(row["dp"]),
        num_model_chunks=int(row.get("v", 1)), pipeline_schedule=row.get("schedule") or "1f1b",
        zero=bool(row.get("zero", False)),
    )  # fmt: skip
    return Layout(
        parallel=parallel,
        micro_batch_size=int(row["micro_batch_size"]),
        recompute=row.get("recompute") or "none",
    )


def key_of(row: dict[str, Any]) -> tuple:
    lay = layout_of(row)
    key = [lay.get(k) for k in KEYS]
    if lay.parallel.pp_size == 1:
        key[KEYS.index("pipeline_schedule")] = "-"  # the schedule is moot without a pipeline
    return tuple(key)


def key_of_overrides(text: str) -> tuple:
    """The layout key of a `--section.key=value ...` string (defaults for keys it leaves out)."""
    names = {"tp_size": "tp", "pp_size": "pp", "dp_size": "dp", "num_model_chunks": "v",
             "pipeline_schedule": "schedule", "micro_batch_size": "micro_batch_size",
             "recompute": "recompute", "zero": "zero"}  # fmt: skip
    row: dict[str, Any] = {"tp": 1, "pp": 1, "dp": 1, "v": 1, "micro_batch_size": 1}
    for arg in text.split():
        key, _, value = arg.lstrip("-").partition("=")
        field = names.get(key.split(".")[-1])
        if field == "zero":
            row[field] = value.lower() == "true"
        elif field is not None:
            row[field] = value
    return key_of(row)


def predict(row: dict[str, Any], *, gpu: str, gpus_per_node: int, model: str | None = None) -> dict[str, Any]:
    """The planner's JSON entry for the row's layout (all dimensions fixed); ValueError if it cannot run."""
    name = model or row["model"]
    if name not in MODEL_PRESETS:
        raise ValueError(f"model {name!r} is not a preset; pass --model")
    w = Workload(
        model=ModelConfig(preset=name, **MODEL_PRESETS[name]),
        seq_len=int(row["seq_len"]),
        global_batch_size=int(row["global_batch_size"]),
        dtype=row.get("dtype") or "bfloat16",
    )
    lay = layout_of(row)
    fixed = {k: lay.get(k) for k in KEYS}
    compiled = str(row.get("compile", False)).lower() == "true"  # bench records say whether they compiled
    result = run_plan(
        w, load_hardware(gpu), num_gpus=lay.num_gpus, gpus_per_node=gpus_per_node, fixed=fixed, margin=0.0,
        allow_zero=True, kernels=Kernels(compiled=compiled),
    )  # fmt: skip
    return result.ranked[0].as_dict()


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx) ** 0.5
    vy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (vx * vy) if vx and vy else float("nan")


def read_rows(paths: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(measured rows, failed rows) from JSON-lines files; non-JSON lines are ignored."""
    ok, failed = [], []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            row = json.loads(line)
            (failed if "error" in row or row.get("tokens_per_s_per_gpu") is None else ok).append(row)
    return ok, failed


def compare(
    rows: list[dict[str, Any]], *, gpu: str, gpus_per_node: int, first_choice: dict[str, Any] | None = None,
    model: str | None = None,
) -> tuple[str, dict[str, Any]]:  # fmt: skip
    """The markdown report and its summary numbers."""
    lines = [
        "| layout (t, p, d, v, b, schedule, recompute, zero) | measured tokens/s/GPU | predicted | error "
        "| measured MFU | predicted MFU | measured peak GiB | predicted GiB | memory error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    measured, predicted, mem_errors = [], [], []
    for row in rows:
        pred = predict(row, gpu=gpu, gpus_per_node=gpus_per_node, model=model)
        meas_tps, pred_tps = float(row["tokens_per_s_per_gpu"]), float(pred["tokens_per_s_per_gpu"])
        measured.append(meas_tps)
        predicted.append(pred_tps)
        peak = row.get("peak_memory_gib")
        mem_text = ("-", "-")
        if peak:
            err = pred["memory_gib"] / float(peak) - 1
            mem_errors.append(err)
            mem_text = (f"{float(peak):.1f}", f"{err:+.1%}")
        mfu = row.get("mfu")
        lines.append(
            f"| {', '.join(str(x) for x in key_of(row))} | {meas_tps:,.0f} | {pred_tps:,.0f} "
            f"| {pred_tps / meas_tps - 1:+.1%} | {_pct(mfu)} | {_pct(pred['mfu'])} | {mem_text[0]} "
            f"| {pred['memory_gib']:.1f} | {mem_text[1]} |"
        )
    summary: dict[str, Any] = {"layouts": len(rows)}
    report = lines
    if len(rows) >= 2:
        summary["spearman"] = spearman(predicted, measured)
        report.append(f"\nSpearman rank correlation (predicted vs measured tokens/s/GPU): "
                      f"{summary['spearman']:.3f} (want >= 0.8) over {len(rows)} layouts")  # fmt: skip
    best = max(measured) if measured else None
    if first_choice is not None and best:
        match = [r for r in rows if key_of(r) == key_of(first_choice)]
        if match:
            gap = 1 - float(match[0]["tokens_per_s_per_gpu"]) / best
            summary["first_choice_gap"] = gap
            report.append(f"planner's first choice {key_of(first_choice)}: {gap:.1%} below the measured best "
                          "(want <= 5%)")  # fmt: skip
        else:
            report.append(f"planner's first choice {key_of(first_choice)} was not measured")
    if mem_errors:
        worst = max(mem_errors, key=abs)
        summary["max_memory_error"] = worst
        mean = sum(abs(e) for e in mem_errors) / len(mem_errors)
        report.append(f"memory estimate vs measured peak: worst {worst:+.1%}, mean |error| {mean:.1%} "
                      "(want within 10%)")  # fmt: skip
    return "\n".join(report), summary


def _pct(x: Any) -> str:
    return "-" if x is None else f"{float(x):.1%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", nargs="*", help="JSON-lines files from threefold bench")
    parser.add_argument("--plan", help="`threefold plan --json` output (its first entry is the first choice)")
    parser.add_argument("--gpu", default="h200")
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--model", help="model preset (default: each row's `model`)")
    parser.add_argument(
        "--which-first", nargs="*", metavar="NAME|OVERRIDES",
        help="with --plan: the NAME whose overrides are the plan's first choice, or none",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.which_first is not None:
        first_key = key_of(json.loads(Path(args.plan).read_text())[0])
        names = [
            e.split("|", 1)[0] for e in args.which_first if key_of_overrides(e.split("|", 1)[1]) == first_key
        ]
        print(names[0] if names else "none")
        return 0
    if not args.bench:
        parser.error("give at least one JSON-lines file from threefold bench")
    rows, failed = read_rows(args.bench)
    first = json.loads(Path(args.plan).read_text())[0] if args.plan else None
    report, _ = compare(
        rows, gpu=args.gpu, gpus_per_node=args.gpus_per_node, first_choice=first, model=args.model
    )
    print(report)
    for row in failed:
        print(f"failed: {row.get('name', '?')}: {row.get('error', 'no measurement')}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
