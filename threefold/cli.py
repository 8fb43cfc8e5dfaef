"""The `threefold` command: one argparse parser with a subcommand per task (threefold/commands/).

`threefold` alone prints the help; `threefold COMMAND --help` lists a command's options. Errors a user
can cause print one line, `threefold: error: ...`, and exit with status 2. launch.py re-executes this
module (`python -m threefold.cli ...`) in each local worker.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

from threefold.commands import checkpoints, infer, run, show
from threefold.commands.args import (
    Parser,
    UsageError,
    add_command,
    check_leftovers,
    load_run_config,
    split_overrides,
)

_load = load_run_config  # the old name, which tests/test_config.py still imports

EPILOG = """With no CONFIG, `threefold train` runs the packaged demo: the tiny Llama preset on Shakespeare,
4 CPU processes (tp=2, dp=2). Run `threefold COMMAND --help` for a command's options."""


def version() -> str:
    """The installed package's version (the source tree's when it is not installed)."""
    try:
        return metadata.version("threefold")
    except metadata.PackageNotFoundError:
        from threefold import __version__

        return __version__


def build_parser() -> tuple[Parser, list[str]]:
    """The top-level parser and its command names, in the order `--help` lists them."""
    parser = Parser(
        prog="threefold", allow_abbrev=False, epilog=EPILOG,
        description="Train GPT/Llama-style language models with tensor, pipeline and data parallelism.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"threefold {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    run.register(sub)  # train, bench
    _register_data(sub)
    show.register(sub)  # config, schedule
    _register_plan(sub)
    checkpoints.register(sub)  # import-hf, export-hf, checkpoint convert
    infer.register(sub)  # generate, eval
    topic = add_command(sub, "help", _cmd_help, help="show this help, or a command's: threefold help train")
    topic.add_argument("topic", nargs="?", metavar="COMMAND")
    return parser, list(sub.choices)


def _register_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="datasets: prepare, inspect", description="Dataset tools.")
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    # `data prepare` and `data inspect` parse their own arguments (threefold/data/), --help included.
    add_command(
        actions, "prepare", _cmd_prepare, passthrough=True, add_help=False,
        help="tokenize text, JSON lines (.gz, .zst), Parquet, Arrow or saved HF datasets (or Shakespeare) "
        "into token files with document indexes",
    )  # fmt: skip
    add_command(
        actions, "inspect", _cmd_inspect, passthrough=True, add_help=False,
        help="show a prepared dataset: tokens, documents, lengths, checksums, a decoded sample",
    )  # fmt: skip


def _cmd_prepare(args: argparse.Namespace) -> int:
    from threefold.data.prepare import prepare_main

    try:
        return prepare_main(args.passthrough)
    except SystemExit as e:  # its own parser exits after --help or a usage error
        return int(e.code or 0)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from threefold.data.inspect import inspect_main

    try:
        return inspect_main(args.passthrough)
    except SystemExit as e:  # its own parser exits after --help or a usage error
        return int(e.code or 0)


def _register_plan(sub: argparse._SubParsersAction) -> None:
    from threefold.plan import cli as plan_cli

    plan = add_command(
        sub, "plan", plan_cli.run, description=plan_cli.DESCRIPTION,
        help="the fastest layouts that fit, predicted; or --calibrate this machine as a --gpu preset",
    )  # fmt: skip
    plan_cli.add_arguments(plan)


def _cmd_help(args: argparse.Namespace) -> int:
    return main([args.topic, "--help"] if args.topic else ["--help"])


def main(argv: list[str] | None = None) -> int:
    """Run `threefold ARGV`; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    if not argv:
        parser.print_help()
        return 0
    if not argv[0].startswith("-") and argv[0] not in commands:
        print(f"threefold: error: unknown command {argv[0]!r}; the commands are: {', '.join(commands)}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        try:
            rest, overrides = split_overrides(argv)
            args, leftovers = parser.parse_known_args(rest)
        except SystemExit as e:  # --help and --version print, then argparse exits
            return int(e.code or 0)
        check_leftovers(args, leftovers, overrides)
        status = int(args.command_run(args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return status
    except UsageError as e:
        print(f"threefold: error: {e} (see '{e.prog} --help')", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"threefold: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our output went away (`threefold data inspect DIR | head`): not an error of ours.
        # Point stdout at /dev/null so that the interpreter's final flush does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE (128 + 13)


if __name__ == "__main__":
    sys.exit(main())
