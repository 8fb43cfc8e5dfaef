"""Print the simulator's bubble and peak activations of every pipeline schedule as a markdown table.

    PYTHONPATH=. python bench/schedule_table.py [--f 1 --b 1 --w 1]

Bubble: idle over busy time of the busiest rank. Peak activations: the most forwards awaiting their B on
any rank, in micro-batches of a whole stage (a chunk of a v-chunk schedule holds 1/v of a stage).
Interleaved runs v = 2 chunks, ZB-V its two chunks in a V; an unsplit backward costs B + W.
"""

from __future__ import annotations

import argparse

from threefold.pipeline.schedules import build_schedule
from threefold.pipeline.sim import simulate

SCHEDULES = (("1f1b", 1), ("interleaved", 2), ("zb-h1", 1), ("zb-v", 2))


def table(f: float, b: float, w: float, cases: list[tuple[int, int]]) -> str:
    head = (
        " | ".join(f"{n} bubble" for n, _ in SCHEDULES)
        + " | "
        + " | ".join(f"{n} peak" for n, _ in SCHEDULES)
    )
    lines = [f"| p | m | {head} | zb-h1 / 1f1b |", "|---" * (3 + 2 * len(SCHEDULES)) + "|"]
    for p, m in cases:
        results = [
            simulate(build_schedule(n, p, v, m), forward_cost=f, backward_cost=b, weight_cost=w)
            for n, v in SCHEDULES
        ]
        bubbles = " | ".join(f"{r.bubble_fraction:.3f}" for r in results)
        peaks = " | ".join(
            f"{max(r.peak_in_flight) / v:g}" for r, (_, v) in zip(results, SCHEDULES, strict=True)
        )
        ratio = results[2].bubble_fraction / results[0].bubble_fraction
        lines.append(f"| {p} | {m} | {bubbles} | {peaks} | {ratio:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--f", type=float, default=1.0)
    parser.add_argument("--b", type=float, default=1.0)
    parser.add_argument("--w", type=float, default=1.0)
    args = parser.parse_args()
    cases = [(p, k * p) for p in (2, 4, 8) for k in (1, 2, 4, 8)]
    print(f"F = {args.f:g}, B = {args.b:g}, W = {args.w:g}\n")
    print(table(args.f, args.b, args.w, cases))


if __name__ == "__main__":
    main()
