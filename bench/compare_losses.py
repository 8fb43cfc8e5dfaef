"""Compare runs' train and validation losses with a reference run (layout parity on real hardware)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def losses(run: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    return train, [r["val/loss"] for r in rows if "val/loss" in r]


def main() -> None:
    ref_run, *runs = map(Path, sys.argv[1:])
    ref_train, ref_val = losses(ref_run)
    print(f"reference {ref_run.name}: train {ref_train[0]:.5f} -> {ref_train[-1]:.5f}, val {ref_val}")
    print("| run | steps | max rel. diff train loss | max rel. diff val loss |")
    print("|---|---:|---:|---:|")
    for run in runs:
        try:
            train, val = losses(run)
        except OSError as e:
            print(f"| {run.name} | failed: {e} | | |")
            continue
        dt = max(abs(a - b) / abs(b) for a, b in zip(train, ref_train, strict=True))
        dv = max((abs(a - b) / abs(b) for a, b in zip(val, ref_val, strict=True)), default=float("nan"))
        print(f"| {run.name} | {len(train)} | {dt:.2e} | {dv:.2e} |")
        first = ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(train[:8], ref_train[:8], strict=False))
        print(f"  first steps (run/reference): {first}")


if __name__ == "__main__":
    main()
