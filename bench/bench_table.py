"""Summarize a bench.jsonl written by `threefold bench --json-out`: one table row per benchmark record, and
for the tiny parity runs the largest relative loss difference of each against the first (1 GPU).

Usage: python3 bench/bench_table.py OUT/bench.jsonl
"""

from __future__ import annotations

import json
import sys


def layout(r: dict) -> str:
    flags = [name for name in ("zero", "sequence_parallel") if r.get(name)]
    if r.get("tp", 1) > 1 and r.get("overlap_tp_comm") is False:
        flags.append("no TP overlap")
    return f"t{r['tp']} p{r['pp']} d{r['dp']} v{r['v']}" + "".join(f", {f}" for f in flags)


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print("| model | layout | b | GBS | tokens/s/GPU | TFLOP/s | MFU | step ms | peak GiB (estimated) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["model"] == "tiny":
            continue
        print(
            f"| {r['model']} | {layout(r)} | {r['micro_batch_size']} | {r['global_batch_size']} | "
            f"{r['tokens_per_s_per_gpu']:,.0f} | {r['tflops_per_gpu']:.1f} | {r['mfu']:.1%} | "
            f"{r['step_time_median_s'] * 1e3:.1f} | {r['peak_memory_gib']:.1f} "
            f"({r.get('estimated_memory_gib', float('nan')):.1f}) |"
        )
    tiny = [r for r in rows if r["model"] == "tiny"]
    for r in tiny[1:]:
        ref = tiny[0]["losses"]
        worst = max(abs(x - y) / abs(x) for x, y in zip(ref, r["losses"], strict=True))
        print(f"tiny {layout(r)}: max relative loss difference vs 1 GPU {worst:.2e}")


if __name__ == "__main__":
    main(sys.argv[1])
