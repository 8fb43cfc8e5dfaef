"""Draw the planner's validation errors as an SVG (no plotting library needed): one bar per row of
threefold/plan/validation.json, predicted / reported - 1 on throughput, coloured by source, with the
+-10% target band. Usage: python bench/plan_validation_figure.py docs/planner_validation.svg"""

from __future__ import annotations

import sys
from pathlib import Path

from threefold.plan.validate import counted, summary, validate

COLOURS = {"megatron-2021": "#1f77b4", "torchtitan-a100": "#2ca02c", "threefold": "#d62728"}
WIDTH, ROW, LEFT, SCALE = 760, 14, 230, 1000.0  # SCALE: pixels per unit of relative error


def draw(path: Path) -> None:
    predictions = counted(validate())
    s = summary(predictions)
    height = 60 + ROW * len(predictions) + 40
    zero = LEFT + (WIDTH - LEFT - 20) / 2
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" '
        'font-size="10">',
        f'<text x="10" y="18" font-size="13">threefold plan: predicted / reported throughput - 1 '
        f"({len(predictions)} rows, mean |error| {s['mean_abs_error']:.1%}, largest "
        f"{s['max_abs_error']:.1%})</text>",
        f'<rect x="{zero - 0.1 * SCALE}" y="40" width="{0.2 * SCALE}" '
        f'height="{ROW * len(predictions)}" fill="#eeeeee"/>',
    ]
    for k in (-0.2, -0.1, 0.0, 0.1, 0.2):
        x = zero + k * SCALE
        out.append(f'<line x1="{x}" y1="36" x2="{x}" y2="{40 + ROW * len(predictions)}" stroke="#999" '
                   f'stroke-dasharray="{"" if k == 0 else "2,2"}"/>')  # fmt: skip
        out.append(f'<text x="{x - 12}" y="{52 + ROW * len(predictions)}">{k:+.0%}</text>')
    for i, p in enumerate(predictions):
        y = 40 + ROW * i
        x0, x1 = sorted((zero, zero + p.error * SCALE))
        colour = COLOURS.get(p.row["source"], "#777")
        out.append(f'<text x="10" y="{y + 10}">{p.row["id"]}</text>')
        out.append(
            f'<rect x="{x0}" y="{y + 2}" width="{max(1.0, x1 - x0)}" height="{ROW - 4}" fill="{colour}"/>'
        )
    for j, (source, colour) in enumerate(COLOURS.items()):
        y = height - 14
        out.append(f'<rect x="{10 + 170 * j}" y="{y - 9}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{24 + 170 * j}" y="{y}">{source}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    draw(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/planner_validation.svg"))
