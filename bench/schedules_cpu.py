"""Time real training steps of 1f1b, interleaved, zb-h1 and zb-v on CPU ranks (gloo) and print a table.

    PYTHONPATH=. python bench/schedules_cpu.py [--pp 2] [--microbatches 4] [--rounds 2] [--steps 4]
                                               [--schedules 1f1b,interleaved,zb-h1,zb-v]

With --pp 1 --schedules 1f1b,zb-h1 there is no bubble at all: the two differ only in zb-h1's split backward
(B, then W as separate matrix products on kept inputs), so their ratio is the split's own cost.

Each schedule runs `threefold bench` (fork-started workers, one per pipeline rank, synthetic tokens,
float32, one intra-op thread per rank) on a model whose per-stage compute dominates the transfers: a
few wide layers and a small vocabulary (so the ends cost little), micro-batch 4 of 128 tokens. The
schedules take turns, `--rounds` times, so drift in the machine's load touches all of them alike; the
table gives each schedule's median step time over all rounds next to the simulator's bubble.

Meaningful only with at least one free core per rank: with more ranks than cores the wall time measures
the total work, not the idle time of the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from threefold.pipeline.schedules import build_schedule
from threefold.pipeline.sim import simulate

SCHEDULES = (("1f1b", 1), ("interleaved", 2), ("zb-h1", 1), ("zb-v", 2))


def run(name: str, v: int, args: argparse.Namespace) -> list[float]:
    """Per-step times (s) of one `threefold bench` run, from its JSON line."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        cmd = [sys.executable, "-m", "threefold.cli", "bench", "--nproc", str(args.pp), "--steps",
               str(args.steps), "--warmup", "1", "--json-out", out.name, "--training.device=cpu",
               f"--parallel.pp_size={args.pp}", f"--parallel.num_model_chunks={v}",
               f"--parallel.pipeline_schedule={name}", f"--model.hidden_size={args.hidden}",
               f"--model.num_layers={args.layers}", "--model.num_heads=8", "--model.vocab_size=512",
               "--model.max_seq_len=128", "--data.seq_len=128", "--training.micro_batch_size=4",
               f"--training.global_batch_size={4 * args.microbatches}"]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        line = json.loads(open(out.name).read().splitlines()[-1])
    return [line["step_time_p10_s"], line["step_time_median_s"], line["step_time_p90_s"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--schedules", default=",".join(name for name, _ in SCHEDULES))
    args = parser.parse_args()
    wanted = args.schedules.split(",")
    schedules = [(name, v) for name, v in SCHEDULES if name in wanted]
    medians: dict[str, list[float]] = {name: [] for name, _ in schedules}
    for r in range(args.rounds):
        order = schedules if r % 2 == 0 else schedules[::-1]
        for name, v in order:
            medians[name].append(run(name, v, args)[1])
            print(f"round {r}: {name} median step {medians[name][-1]:.3f} s", file=sys.stderr, flush=True)
    base = statistics.median(medians["1f1b"])
    print(
        f"pp={args.pp}, m={args.microbatches}, {args.layers} layers of width {args.hidden}, "
        f"micro-batch 4 x 128 tokens, float32, {os.cpu_count()} cores, "
        f"{args.rounds} rounds of {args.steps} steps\n"
    )
    print(
        "| schedule | v | simulated bubble (F=B=W) | step time median (s) | per-round medians (s) | vs 1f1b |"
    )
    print("|---|---|---|---|---|---|")
    for name, v in schedules:
        sim = simulate(
            build_schedule(name, args.pp, v, args.microbatches), backward_cost=1.0, weight_cost=1.0
        )
        med = statistics.median(medians[name])
        rounds = ", ".join(f"{x:.3f}" for x in medians[name])
        print(f"| {name} | {v} | {sim.bubble_fraction:.3f} | {med:.3f} | {rounds} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
