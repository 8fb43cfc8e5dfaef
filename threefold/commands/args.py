"""Argument parsing shared by the commands.

train, bench and config read `[CONFIG.toml]` and config overrides, one per key of
`threefold config --reference`: `--section.key=value`, or `--section.key value`. argparse parses each
command's own options; the overrides are lifted out of the command line first (`split_overrides`),
because argparse would misread them in two ways: it hands the value of `--training.max_steps 5` to the
CONFIG positional (loading a config file named '5'), and it takes `--data.path=my data` for a
positional because the value holds a space. `parse_known_args` then leaves over only what fits
nowhere, and `check_leftovers` names it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from importlib import resources
from typing import Any, NoReturn

from threefold.config import Config, build_config, load_config

DEFAULT_CONFIG = "default.toml"  # packaged: the tiny-Shakespeare CPU demo (tp=2, dp=2)

OVERRIDES_HELP = """config overrides, after the options or among them:
  --section.key=value or --section.key value, for any key `threefold config --reference` lists,
  e.g. --training.max_steps=200 --parallel.tp_size 2"""

_OVERRIDE = re.compile(r"--[A-Za-z_]\w*\.[A-Za-z_]\w*")  # --section.key, without the value


class UsageError(Exception):
    """A command line argparse (or the override check) rejects; `prog` names the command for the hint."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but errors raise UsageError (main prints one line and returns 2) instead of exiting,
    and an option's error reads '--steps must be ...' rather than 'argument --steps: must be ...'."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(re.sub(r"^argument (-[^:]+): ", r"\1 ", message), self.prog)


Run = Callable[[argparse.Namespace], int]
"""A command, given its parsed arguments: `args.overrides` holds the config overrides."""


def add_command(
    sub: Any, name: str, run: Run, *, help: str, description: str | None = None, overrides: bool = False,
    passthrough: bool = False, **kwargs: Any,
) -> Parser:  # fmt: skip
    """Add subcommand `name`; `overrides`: it reads config overrides; `passthrough`: it parses its own
    arguments from `args.passthrough` (argparse only finds the command). Options are never abbreviated:
    `--step` must not quietly mean `--steps`."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    parser: Parser = sub.add_parser(
        name, help=help, description=description or f"{help[0].upper()}{help[1:]}.", allow_abbrev=False,
        **kwargs,
    )  # fmt: skip
    parser.set_defaults(
        command_run=run, command_parser=parser, command_overrides=overrides, command_passthrough=passthrough
    )
    return parser


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


def one_of(*choices: str) -> Callable[[str], str]:
    """A type that accepts only `choices` (argparse's `choices=` words its error less plainly)."""

    def check(text: str) -> str:
        if text not in choices:
            wanted = " or ".join(repr(c) for c in choices)
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return text

    return check


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """The CONFIG positional and the override tail (shown in usage and epilog) of train, bench, config."""
    parser.usage = "%(prog)s [CONFIG.toml] [--section.key=value ...] [options]"
    parser.add_argument("config_path", nargs="?", metavar="CONFIG.toml", help=config_help)
    parser.epilog = OVERRIDES_HELP


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the config overrides as `--section.key=value`).

    `--section.key value` takes the next argument as its value unless that is an option ('-1' and
    '-1e-3' are values); without a value it is an error, not a flag."""
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        name, equals, _ = argv[i].partition("=")
        if not _OVERRIDE.fullmatch(name):
            rest.append(argv[i])
        elif equals:
            overrides.append(argv[i])
        elif i + 1 < len(argv) and (not argv[i + 1].startswith("-") or _is_number(argv[i + 1])):
            overrides.append(f"{name}={argv[i + 1]}")
            i += 1
        else:
            raise ValueError(
                f"override {name!r} has no value: it must look like --section.key=value "
                "or --section.key value"
            )
        i += 1
    return rest, overrides


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_leftovers(args: argparse.Namespace, leftovers: list[str], overrides: list[str]) -> None:
    """Store the overrides (and a passthrough command's arguments) in `args`, or name what is left over:
    a second config file, an unknown option, or overrides for a command that takes none."""
    error = args.command_parser.error
    if args.command_passthrough:
        args.passthrough, leftovers = leftovers, []
    for arg in leftovers:
        if arg.startswith("-"):
            hint = ": overrides look like --section.key=value" if args.command_overrides else ""
            error(f"unknown option {arg!r}{hint}")
        if args.command_overrides:
            given = f" ({args.config_path!r} is the config)" if args.config_path else ""
            error(f"unexpected argument {arg!r}: one config file at most{given}, then overrides")
        error(f"unrecognized arguments: {' '.join(leftovers)}")
    if overrides and not args.command_overrides:
        error(f"takes no config overrides: {' '.join(overrides)}")
    args.overrides = overrides


def load_run_config(path: str | None, overrides: list[str], *, check_paths: bool = True) -> Config:
    """The config file at `path` (None: the packaged demo, default.toml) with `overrides` applied."""
    if path is not None:
        return load_config(path, overrides, check_paths=check_paths)
    import tomllib

    raw = tomllib.loads(resources.files("threefold").joinpath(DEFAULT_CONFIG).read_text())
    return build_config(raw, overrides, check_paths=check_paths)
