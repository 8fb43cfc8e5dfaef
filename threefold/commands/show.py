"""`threefold config` and `threefold schedule`: print something, start nothing."""

from __future__ import annotations

import argparse
from typing import Any

from threefold.commands.args import add_command, add_config_arguments, load_run_config

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
    schedule.add_argument("--v", type=int, default=1, help="model chunks per rank (interleaving)")
    schedule.add_argument("-m", "--microbatches", type=int, default=8, help="micro-batches per step")
    schedule.add_argument("--schedule", choices=["gpipe", "1f1b", "interleaved"], default=None,
                          help="default: interleaved when --v > 1, else 1f1b")  # fmt: skip
    schedule.add_argument("--forward-cost", type=float, default=1.0)
    schedule.add_argument("--backward-cost", type=float, default=1.0)


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


def cmd_schedule(args: argparse.Namespace) -> int:
    from threefold.pipeline.schedules import build_schedule
    from threefold.pipeline.sim import simulate, timeline

    name = args.schedule or ("interleaved" if args.v > 1 else "1f1b")
    p, v, m = args.pp, args.v, args.microbatches
    result = simulate(
        build_schedule(name, p, v, m), forward_cost=args.forward_cost, backward_cost=args.backward_cost
    )
    print(f"{name}: pp={p}, v={v}, m={m}; F<chunk>.<micro-batch>, B likewise; chunk c runs on rank c % {p}")
    print(timeline(result))
    print(f"bubble fraction: {result.bubble_fraction:.4f} (simulated), {(p - 1) / (v * m):.4f} = (p-1)/(v*m)")
    print(f"makespan {result.makespan:g}, busy time per rank {result.ideal:g}")
    in_flight = ", ".join(f"{n / v:g}" for n in result.peak_in_flight)
    print(f"peak activations in flight per rank, in micro-batches of a whole stage: {in_flight}")
    return 0
