"""Summarize a run's metrics.jsonl: medians over steady-state steps (BENCHMARKS.md convention)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COLUMNS = [
    ("perf/tokens_per_s_per_device", "tokens/s/GPU", "{:,.0f}"),
    ("perf/tflops_per_device", "TFLOP/s/GPU", "{:.1f}"),
    ("perf/mfu", "MFU", "{:.1%}"),
    ("perf/step_seconds", "s/step", "{:.3f}"),
    ("perf/peak_memory_gib", "peak GiB", "{:.1f}"),
]


def summarize(run_dir: Path, skip: int) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [r for r in rows if r["step"] > skip and "perf/tokens_per_s_per_device" in r]
    if len(steady) < 10:
        raise ValueError(f"{run_dir}: only {len(steady)} steady steps after skipping {skip}; need >= 10")
    out = {key: statistics.median(r[key] for r in steady if key in r) for key, _, _ in COLUMNS[:-1]}
    out["perf/peak_memory_gib"] = max(r.get("perf/peak_memory_gib", 0.0) for r in steady)
    out["steps"] = len(steady)
    out["final_loss"] = [r["train/loss"] for r in rows if "train/loss" in r][-1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (logging.out_dir)")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out")
    args = parser.parse_args()
    print("| run | " + " | ".join(name for _, name, _ in COLUMNS) + " | steps | last loss |")
    print("|---|" + "---:|" * (len(COLUMNS) + 2))
    for run in args.runs:
        try:
            s = summarize(run, args.skip)
        except (OSError, ValueError, KeyError) as e:
            print(f"| {run.name} | failed: {e} |")
            continue
        cells = [fmt.format(s[key]) for key, _, fmt in COLUMNS]
        print(f"| {run.name} | " + " | ".join(cells) + f" | {s['steps']} | {s['final_loss']:.3f} |")


if __name__ == "__main__":
    main()
