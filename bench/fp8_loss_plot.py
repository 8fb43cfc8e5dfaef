"""Compare and plot the two loss curves of bench/fp8_loss.sh (bf16 and fp8 tensorwise, same data and seed).

The guard of issue 18: fp8's loss stays within 1% of bf16's. Step losses are noisy (one batch each), so the
curves are compared as trailing means over --window steps, from step --from on (the first steps fall from
~12 and differ most in absolute terms while both are far from any plateau). Prints the largest relative
gap, the gap of the last window, and each run's median tokens/s and peak memory; writes an SVG plot.

Usage: python bench/fp8_loss_plot.py DIR [--svg docs/fp8_loss.svg] [--window 20] [--from 50] [--control JSONL]
       python bench/fp8_loss_plot.py DIR --seeds [--fp8 tensorwise rowwise] [--svg F]   (DIR holds
       false-seedN / <recipe>-seedN runs from `SEED=N [MODES=...] bash bench/fp8_loss.sh`: each recipe's
       mean curve over the seeds against bf16's, bf16's own spread; exit 2 where a mean curve leaves 1%)
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


def seed_pairs(directory: Path, fp8: str = "tensorwise") -> dict[str, tuple[Path, Path]]:
    """{seed label: (bf16 run, fp8 run)} for the `fp8` recipe: false.jsonl with <fp8>.jsonl ('base'), and
    each false-seedN.jsonl with its <fp8>-seedN.jsonl (bench/fp8_loss.sh with SEED=N, MODES=...)."""
    pairs = {}
    for bf16 in sorted(directory.glob("false*.jsonl")):
        label = bf16.stem.removeprefix("false").removeprefix("-") or "base"
        partner = directory / bf16.name.replace("false", fp8, 1)
        if partner.exists():
            pairs[label] = (bf16, partner)
    return pairs


def seed_curves(
    directory: Path, window: int, fp8: str = "tensorwise"
) -> tuple[list[int], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The steps every seed pair of `fp8` shares, and each pair's trailing-mean loss curves (bf16, fp8)."""
    pairs = seed_pairs(directory, fp8)
    if not pairs:
        raise ValueError(f"{directory} holds no pair of false*.jsonl and {fp8}*.jsonl runs")
    runs = {label: tuple(read_run(p)["train/loss"] for p in pair) for label, pair in pairs.items()}
    steps = sorted(set.intersection(*(set(r) for pair in runs.values() for r in pair)))
    if not steps:
        raise ValueError(f"the runs in {directory} share no step")
    smooth = {
        label: tuple(trailing_mean(np.array([curve[s] for s in steps]), window) for curve in pair)
        for label, pair in runs.items()
    }
    return steps, smooth  # type: ignore[return-value]


def seed_summary(directory: Path, window: int, start: int = 50, fp8: str = "tensorwise") -> dict[str, float]:
    """Over every seed pair of the `fp8` recipe in `directory`, on trailing means over `window` steps:
    - gap: fp8's mean curve against bf16's mean curve (both over the seeds) in the last window;
    - largest_gap, largest_gap_step: the largest |gap| of those mean curves from step `start` on, and
      where; the guard holds where it is within 1%;
    - within: the share of steps from `start` on where the mean curves are within 1%;
    - bf16_spread: the largest last-window distance of one bf16 run from the bf16 mean;
    - pair_gaps_max: the largest last-window gap of one seed's fp8 run to its own bf16 run.
    All relative to bf16. The spread and the single pairs say how much of a gap one pair of runs could
    show by chance (the trajectories of two runs part even when only bf16 rounding differs)."""
    steps, smooth = seed_curves(directory, window, fp8)
    bf16 = np.array([pair[0] for pair in smooth.values()])  # (seeds, steps)
    other = np.array([pair[1] for pair in smooth.values()])
    gap = other.mean(0) / bf16.mean(0) - 1
    after = np.array(steps) >= start
    if not after.any():
        raise ValueError(f"the runs in {directory} end before step {start}")
    worst = int(np.argmax(np.abs(gap) * after))
    return {
        "seeds": float(len(smooth)),
        "gap": float(gap[-1]),
        "largest_gap": float(gap[worst]),
        "largest_gap_step": float(steps[worst]),
        "within": float(np.mean(np.abs(gap[after]) <= 0.01)),
        "bf16_spread": float(np.abs(bf16[:, -1] - bf16[:, -1].mean()).max() / bf16[:, -1].mean()),
        "pair_gaps_max": float(np.abs(other[:, -1] / bf16[:, -1] - 1).max()),
    }


def plot_seeds(directory: Path, svg: Path, window: int, recipes: list[str]) -> None:
    """Upper panel: bf16's and each recipe's loss curves averaged over the seeds (trailing means); lower
    panel: each recipe's mean-curve gap to bf16 (thick) and each seed's own pair gap (thin), +-1% dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 2])
    colors = {"tensorwise": "tab:orange", "rowwise": "tab:green"}
    for i, recipe in enumerate(recipes):
        steps, smooth = seed_curves(directory, window, recipe)
        bf16 = np.array([pair[0] for pair in smooth.values()])
        other = np.array([pair[1] for pair in smooth.values()])
        if i == 0:
            top.plot(steps, bf16.mean(0), color="tab:blue", label=f"bf16 ({len(smooth)} seeds)")
        color = colors.get(recipe, "tab:red")
        top.plot(steps, other.mean(0), color=color, label=f"fp8 {recipe} ({len(smooth)} seeds)")
        for pair_bf16, pair_fp8 in zip(bf16, other, strict=True):
            bottom.plot(steps, 100 * (pair_fp8 / pair_bf16 - 1), color=color, linewidth=0.5, alpha=0.4)
        bottom.plot(steps, 100 * (other.mean(0) / bf16.mean(0) - 1), color=color, linewidth=1.8, label=recipe)
    top.set_ylabel(f"training loss ({window}-step mean)")
    top.set_ylim(1, 5)
    top.legend()
    top.set_title("llama-1b, 16,384 tokens/step, 1x H200: bf16 vs fp8, mean over seeds")
    bottom.axhline(1, color="red", linestyle=":")
    bottom.axhline(-1, color="red", linestyle=":")
    bottom.set_ylim(-6, 6)
    bottom.set_ylabel("gap to bf16 (%)")
    bottom.set_xlabel("step (thick: mean curves; thin: each seed's pair)")
    bottom.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(svg)
    print(f"wrote {svg}")


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
    parser.add_argument(
        "--fp8", nargs="+", default=["tensorwise"], metavar="RECIPE", help="with --seeds: the recipes"
    )
    args = parser.parse_args()
    if args.make_corpus is not None:
        make_corpus(args.make_corpus)
        return 0
    if args.seeds and args.dir is not None:
        met = True
        for recipe in args.fp8:
            got = seed_summary(args.dir, args.window, args.start, recipe)
            met = met and abs(got["largest_gap"]) <= 0.01
            print(
                f"{recipe}, {got['seeds']:.0f} seeds, {args.window}-step trailing means: fp8's mean curve "
                f"{got['gap']:+.3%} from bf16's in the last window, at most {got['largest_gap']:+.3%} "
                f"(step {got['largest_gap_step']:.0f}) from step {args.start} on, within 1% at "
                f"{got['within']:.0%} of those steps; bf16 runs within {got['bf16_spread']:.3%} of their "
                f"mean; the largest single-pair gap {got['pair_gaps_max']:.3%}"
            )
        if args.svg is not None:
            plot_seeds(args.dir, args.svg, args.window, args.fp8)
        return 0 if met else 2
    if args.dir is None:
        parser.error("give DIR or --make-corpus")
    return compare(args.dir, args.svg, args.window, args.start, args.control)


if __name__ == "__main__":
    sys.exit(main())
