"""Compare and plot the two loss curves of bench/fp8_loss.sh (bf16 and fp8 tensorwise, same data and seed).

The guard of issue 18: fp8's loss stays within 1% of bf16's. Step losses are noisy (one batch each), so the
curves are compared as trailing means over --window steps, from step --from on (the first steps fall from
~12 and differ most in absolute terms while both are far from any plateau). Prints the largest relative
gap, the gap of the last window, and each run's median tokens/s and peak memory; writes an SVG plot.

Usage: python bench/fp8_loss_plot.py DIR [--svg docs/fp8_loss.svg] [--window 20] [--from 50] [--control JSONL]
       python bench/fp8_loss_plot.py DIR --seeds   (DIR also holds false-seedN / tensorwise-seedN pairs,
       from `SEED=N bash bench/fp8_loss.sh`: fp8's mean curve against bf16's, and bf16's own spread)
       python bench/fp8_loss_plot.py --make-corpus data/fp8-src/code.jsonl   (the corpus's JSON lines)
DIR holds false.jsonl and tensorwise.jsonl (the runs' metrics.jsonl files).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

CORPUS_ROOTS = ("/usr/lib/python3.11", "transformers", "torch")
CORPUS_BYTES = 40_000_000


def read_run(path: Path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of a metrics.jsonl."""
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and value is not None:
                series.setdefault(key, {})[int(record["step"])] = float(value)
    return series


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    sums = np.cumsum(np.concatenate([[0.0], values]))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(np.arange(1, len(values) + 1) - window, 0)]) / counts


def compare(directory: Path, svg: Path | None, window: int, start: int, control: Path | None = None) -> int:
    runs = {
        name: read_run(directory / f"{mode}.jsonl")
        for name, mode in (("bf16", "false"), ("fp8", "tensorwise"))
    }
    steps = sorted(set(runs["bf16"]["train/loss"]) & set(runs["fp8"]["train/loss"]))
    if not steps:
        print("no common steps", file=sys.stderr)
        return 1
    curves = {name: np.array([run["train/loss"][s] for s in steps]) for name, run in runs.items()}
    smooth = {name: trailing_mean(curve, window) for name, curve in curves.items()}
    gap = (smooth["fp8"] - smooth["bf16"]) / smooth["bf16"]
    mask = np.array(steps) >= start
    worst = int(np.argmax(np.abs(gap) * mask))
    print(f"{len(steps)} common steps; trailing mean over {window} steps, from step {start}:")
    side = "above" if gap[worst] > 0 else "below"
    print(f"  largest |gap| {abs(gap[worst]):.3%} at step {steps[worst]} (fp8 {side})")
    print(f"  last window: bf16 {smooth['bf16'][-1]:.4f}, fp8 {smooth['fp8'][-1]:.4f}, gap {gap[-1]:+.3%}")
    for name, run in runs.items():
        speed = list(run.get("perf/tokens_per_s_per_device", {}).values())[10:]
        peak = max(run.get("perf/peak_memory_gib", {0: float("nan")}).values())
        if speed:
            median = statistics.median(speed)
            print(f"  {name}: median {median:,.0f} tokens/s (after the 10th step), peak {peak:.1f} GiB")
    control_gap = None
    if control is not None:  # bf16 again with another seed: how far two bf16 runs drift apart
        other = read_run(control)["train/loss"]
        if set(steps) <= set(other):
            control_curve = trailing_mean(np.array([other[s] for s in steps]), window)
            control_gap = (control_curve - smooth["bf16"]) / smooth["bf16"]
            worst_control = int(np.argmax(np.abs(control_gap) * mask))
            print(
                f"  control (bf16, {control.name}): largest |gap| {abs(control_gap[worst_control]):.3%} at "
                f"step {steps[worst_control]}, last window {control_gap[-1]:+.3%}"
            )
    if svg is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
        for name, color in (("bf16", "tab:blue"), ("fp8", "tab:orange")):
            top.plot(steps, curves[name], color=color, alpha=0.25, linewidth=0.7)
            top.plot(steps, smooth[name], color=color, label=f"{name} ({window}-step mean)")
        top.set_ylabel("training loss")
        top.set_ylim(top=min(float(curves["bf16"][:start].max(initial=0)) + 0.5, 12.5))
        top.legend()
        top.set_title("llama-1b, seq 2048, 16,384 tokens/step, 1x H200: bf16 vs fp8 tensorwise")
        bottom.plot(steps, 100 * gap, color="black", linewidth=0.8, label="fp8")
        if control_gap is not None:
            bottom.plot(
                steps,
                100 * control_gap,
                color="gray",
                linewidth=0.8,
                linestyle="--",
                label="bf16, other seed",
            )
            bottom.legend(fontsize="small")
        bottom.axhline(1, color="red", linestyle=":")
        bottom.axhline(-1, color="red", linestyle=":")
        bottom.set_ylabel("gap to bf16 (%)")
        bottom.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(svg)
        print(f"wrote {svg}")
    return 0 if abs(gap[worst]) <= 0.01 else 2


def seed_pairs(directory: Path) -> dict[str, tuple[Path, Path]]:
    """{seed label: (bf16 run, fp8 run)}: false.jsonl with tensorwise.jsonl ('base'), and each
    false-seedN.jsonl with its tensorwise-seedN.jsonl (bench/fp8_loss.sh with SEED=N)."""
    pairs = {}
    for bf16 in sorted(directory.glob("false*.jsonl")):
        label = bf16.stem.removeprefix("false").removeprefix("-") or "base"
        fp8 = directory / bf16.name.replace("false", "tensorwise", 1)
        if fp8.exists():
            pairs[label] = (bf16, fp8)
    return pairs


def seed_summary(directory: Path, window: int) -> dict[str, float]:
    """Over every seed pair in `directory`: the last-window gap of fp8's mean curve to bf16's, and the
    spread of the bf16 runs themselves (the largest last-window distance of one bf16 run from their
    mean), both relative to bf16's mean. fp8 passes the guard where its gap is within 1%; the spread
    says how much of a gap one pair of runs could show by chance."""
    pairs = seed_pairs(directory)
    if not pairs:
        raise ValueError(f"{directory} holds no pair of false*.jsonl and tensorwise*.jsonl runs")
    runs = {label: tuple(read_run(p)["train/loss"] for p in pair) for label, pair in pairs.items()}
    steps = sorted(set.intersection(*(set(r) for pair in runs.values() for r in pair)))
    if not steps:
        raise ValueError(f"the runs in {directory} share no step")

    def last(curve: dict[int, float]) -> float:
        return float(trailing_mean(np.array([curve[s] for s in steps]), window)[-1])

    bf16 = np.array([last(pair[0]) for pair in runs.values()])
    fp8 = np.array([last(pair[1]) for pair in runs.values()])
    return {
        "seeds": float(len(runs)),
        "gap": float(fp8.mean() / bf16.mean() - 1),
        "bf16_spread": float(np.abs(bf16 - bf16.mean()).max() / bf16.mean()),
        "pair_gaps_max": float(np.abs(fp8 / bf16 - 1).max()),
    }


def make_corpus(out: Path) -> None:
    """Python source as JSON lines, one file a document: the standard library, then transformers and torch
    (from the running interpreter's site-packages), stopping after CORPUS_BYTES."""
    import importlib.util

    roots = []
    for root in CORPUS_ROOTS:
        spec = importlib.util.find_spec(root) if "/" not in root else None
        roots.append(Path(root) if spec is None else Path(spec.origin or "").parent)
    total = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for root in roots:
            for path in sorted(root.rglob("*.py")):
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if text.strip():
                    f.write(json.dumps({"text": text}) + "\n")
                    total += len(text.encode("utf-8"))
                if total > CORPUS_BYTES:
                    print(f"wrote {out}: {total / 1e6:.1f} MB")
                    return
    print(f"wrote {out}: {total / 1e6:.1f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", nargs="?", type=Path)
    parser.add_argument("--svg", type=Path, default=None)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--from", dest="start", type=int, default=50)
    parser.add_argument("--control", type=Path, default=None, metavar="JSONL", help="bf16, another seed")
    parser.add_argument("--make-corpus", type=Path, default=None, metavar="JSONL")
    parser.add_argument("--seeds", action="store_true", help="summarize every seed pair in DIR")
    args = parser.parse_args()
    if args.make_corpus is not None:
        make_corpus(args.make_corpus)
        return 0
    if args.seeds and args.dir is not None:
        summary = seed_summary(args.dir, args.window)
        print(
            f"{summary['seeds']:.0f} seeds, last {args.window}-step window: fp8's mean {summary['gap']:+.3%} "
            f"from bf16's; bf16 runs within {summary['bf16_spread']:.3%} of their mean; the largest "
            f"single-pair gap {summary['pair_gaps_max']:.3%}"
        )
        return 0 if abs(summary["gap"]) <= 0.01 else 2
    if args.dir is None:
        parser.error("give DIR or --make-corpus")
    return compare(args.dir, args.svg, args.window, args.start, args.control)


if __name__ == "__main__":
    sys.exit(main())
