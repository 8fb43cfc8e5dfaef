"""`threefold config` and `threefold schedule`: print something, start nothing."""

from __future__ import annotations

import argparse
from typing import Any

from threefold.commands.args import add_command, add_config_arguments, load_run_config
from threefold.pipeline.schedules import SCHEDULES

CONFIG_HELP = "print the resolved config as TOML (save it and it loads back as the same config)"
CONFIG_DESCRIPTION = """Print the config a run would use, as TOML: the file (no CONFIG: the packaged
demo) with the overrides applied and every default filled in. Saved to a file, it is a config file
that loads back as the same config. --reference prints every key with its meaning instead."""


def register(sub: Any) -> None:
    """Add `config` and `schedule` to the top-level subparsers."""
    config = add_command(
        sub, "config", cmd_config, help=CONFIG_HELP, description=CONFIG_DESCRIPTION, overrides=True
    )
    add_config_arguments(config, "the config file to resolve (default: the packaged demo)")
    config.add_argument("--reference", action="store_true", help="print every config key and its meaning")

    schedule = add_command(
        sub, "schedule", cmd_schedule, help="print a pipeline schedule's timeline, bubble and memory",
        description="Print a pipeline schedule's timeline and its simulated bubble and memory; "
        "starts no process.",
    )  # fmt: skip
    schedule.add_argument("--pp", type=int, default=4, help="pipeline-parallel size p")
    schedule.add_argument("--v", "--chunks", dest="v", type=int, default=None,
                          help="model chunks per rank (default: 2 for interleaved and zb-v, "
                          "else 1)")  # fmt: skip
    schedule.add_argument("-m", "--microbatches", type=int, default=8, help="micro-batches per step")
    schedule.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                          help="default: interleaved when --v > 1, else 1f1b")  # fmt: skip
    schedule.add_argument("--f", "--forward-cost", dest="forward_cost", type=float, default=1.0,
                          help="time of a forward F (default 1)")  # fmt: skip
    schedule.add_argument("--b", "--backward-cost", dest="backward_cost", type=float, default=1.0,
                          help="time of B, the input-gradient half of a backward (default 1)")  # fmt: skip
    schedule.add_argument("--w", "--weight-cost", dest="weight_cost", type=float, default=1.0,
                          help="time of W, the weight-gradient half; a backward that is not split "
                          "takes B + W (default 1)")  # fmt: skip
    schedule.add_argument("--compare", action="store_true",
                          help="also print every schedule's bubble and peak activations in one "
                          "table")  # fmt: skip


def cmd_config(args: argparse.Namespace) -> int:
    from threefold.commands.toml_writer import config_toml

    overrides = args.overrides
    if args.reference:
        if args.config_path or overrides:
            args.command_parser.error("--reference prints every key; it takes no config file or overrides")
        from threefold.config import describe_fields

        print(describe_fields())
        return 0
    config = load_run_config(args.config_path, overrides, check_paths=False)
    source = args.config_path or "the packaged demo (default.toml)"
    header = f"threefold config: {source}" + "".join(f" {o}" for o in overrides)
    print(config_toml(config, header=header), end="")
    return 0


def _chunks(name: str, v: int | None) -> int:
    """Chunks per rank for `name` when --v is not given (or does not fit the schedule)."""
    if name in ("1f1b", "zb-h1"):
        return 1
    if name == "zb-v":
        return 2
    return v if v is not None else (2 if name == "interleaved" else 1)


def compare_rows(p: int, m: int, v: int | None, costs: dict[str, float]) -> list[tuple[str, int, Any]]:
    """(schedule, chunks per rank, SimResult or the ValueError's text) of every schedule."""
    from threefold.pipeline.schedules import build_schedule
    from threefold.pipeline.sim import simulate

    rows: list[tuple[str, int, Any]] = []
    for name in SCHEDULES:
        chunks = _chunks(name, v if name in ("gpipe", "interleaved") and v and v > 1 else None)
        try:
            rows.append((name, chunks, simulate(build_schedule(name, p, chunks, m), **costs)))
        except ValueError as e:
            rows.append((name, chunks, str(e)))
    return rows


def compare_table(rows: list[tuple[str, int, Any]]) -> str:
    """The --compare table: bubble (idle over busy time), makespan and peak activations per schedule.

    A chunk holds 1/v of a stage, so the simulator's costs (per chunk action) are divided by v to put
    every schedule's makespan in the costs of a whole stage's F, B and W."""
    lines = [
        "| schedule | v | bubble | makespan (whole-stage costs) | peak activations (stage micro-batches) |",
        "|---|---|---|---|---|",
    ]
    for name, chunks, result in rows:
        if isinstance(result, str):
            lines.append(f"| {name} | {chunks} | - | - | not possible: {result} |")
            continue
        peak = max(result.peak_in_flight) / chunks
        makespan = result.makespan / chunks
        lines.append(f"| {name} | {chunks} | {result.bubble_fraction:.4f} | {makespan:g} | {peak:g} |")
    return "\n".join(lines)


def cmd_schedule(args: argparse.Namespace) -> int:
    from threefold.pipeline.schedules import SPLIT_BACKWARD, build_schedule
    from threefold.pipeline.sim import simulate, timeline

    name = args.schedule or ("interleaved" if args.v and args.v > 1 else "1f1b")
    p, m = args.pp, args.microbatches
    v = args.v if args.v is not None else _chunks(name, None)
    costs = {"forward_cost": args.forward_cost, "backward_cost": args.backward_cost,
             "weight_cost": args.weight_cost}  # fmt: skip
    result = simulate(build_schedule(name, p, v, m), **costs)
    where = "chunks c and 2p-1-c run on rank c (a V)" if name == "zb-v" else f"chunk c runs on rank c % {p}"
    kinds = "B (input gradient) and W (weight gradient)" if name in SPLIT_BACKWARD else "B (whole backward)"
    print(f"{name}: pp={p}, v={v}, m={m}; F<chunk>.<micro-batch>, {kinds} likewise; {where}")
    f, b, w = args.forward_cost, args.backward_cost, args.weight_cost
    print(
        f"costs: F={f:g}, B={b:g}, W={w:g}"
        + ("" if name in SPLIT_BACKWARD else f" (backward = B + W = {b + w:g})")
    )
    print(timeline(result))
    if name in SPLIT_BACKWARD:
        print(
            f"bubble fraction: {result.bubble_fraction:.4f} (simulated), 1f1b's (p-1)/m = {(p - 1) / m:.4f}"
        )
    else:
        paper = (p - 1) / (v * m)
        print(f"bubble fraction: {result.bubble_fraction:.4f} (simulated), {paper:.4f} = (p-1)/(v*m)")
    print(f"makespan {result.makespan:g}, busy time per rank {result.ideal:g}")
    in_flight = ", ".join(f"{n / v:g}" for n in result.peak_in_flight)
    print(f"peak activations in flight per rank, in micro-batches of a whole stage: {in_flight}")
    if args.compare:
        print()
        print(f"every schedule at pp={p}, m={m}, F={f:g}, B={b:g}, W={w:g}:")
        print(compare_table(compare_rows(p, m, args.v, costs)))
    return 0
