"""Per-run checkpoint cost: seconds the training step waited for each save, and the step times."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main() -> None:
    print("| run | blocking s per save (step) | median step s, no save before | median step s after a save |")
    print("|---|---|---:|---:|")
    for run in map(Path, sys.argv[1:]):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        saves = {
            r["step"]: r["checkpoint/blocking_seconds"] for r in rows if "checkpoint/blocking_seconds" in r
        }
        steps = {
            r["step"]: r["perf/step_seconds"] for r in rows if "perf/step_seconds" in r and r["step"] > 3
        }
        after = [steps[s + 1] for s in saves if s + 1 in steps]
        quiet = [t for s, t in steps.items() if s - 1 not in saves]
        blocking = ", ".join(f"{v:.2f} ({k})" for k, v in sorted(saves.items()))
        after_text = f"{statistics.median(after):.3f}" if after else "n/a"
        print(f"| {run.name} | {blocking} | {statistics.median(quiet):.3f} | {after_text} |")


if __name__ == "__main__":
    main()
