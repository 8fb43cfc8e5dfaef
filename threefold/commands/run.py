"""`threefold train` and `threefold bench`: the commands that start workers.

Started outside torchrun, a command checks its config, then launches one process per rank, each
re-running the same command with the same config file and overrides (threefold/launch.py). Under
torchrun (or in such a worker) it runs its body on this rank.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial, wraps
from typing import TYPE_CHECKING, Any

from threefold.commands.args import (
    add_command,
    add_config_arguments,
    load_run_config,
    non_negative_int,
    one_of,
    positive_int,
)
from threefold.config import Config, load_config

if TYPE_CHECKING:  # the names only: torch and the training code load when a command runs
    import torch

    from threefold.launch import WorldInfo
    from threefold.parallel.mesh import Mesh
    from threefold.reliability.faults import FaultPlan

TRAIN_HELP = "train a model (no CONFIG: the packaged demo, tiny Llama on Shakespeare, tp=2 x dp=2 on CPU)"
TRAIN_DESCRIPTION = """Train a model (no CONFIG: the packaged demo, tiny Llama on Shakespeare,
tp=2 x dp=2 on CPU). Started outside torchrun it launches its own workers, one per rank; under
torchrun (or srun with torchrun) each process is one rank."""

BENCH_HELP = "time the training step of a config: tokens/s/GPU, TFLOP/s, MFU, step-time spread, memory"
BENCH_DESCRIPTION = """Time the training step of a config (default: no file, so give at least
--model.preset) and print one JSON line plus a table: tokens/s/GPU, TFLOP/s, MFU, step-time median
and spread, peak memory per rank. Synthetic tokens need no dataset."""


def register(sub: Any) -> None:
    """Add `train` and `bench` to the top-level subparsers."""
    train = add_command(
        sub, "train", cmd_train, help=TRAIN_HELP, description=TRAIN_DESCRIPTION, overrides=True
    )
    add_config_arguments(train, "the run's config file (default: the packaged demo)")
    _add_nproc(train)
    train.add_argument(
        "--layout", type=_layout, metavar="auto",
        help="let the planner choose tp, pp, dp, v, micro-batch, schedule, recompute and ZeRO for this world",
    )  # fmt: skip

    bench = add_command(
        sub, "bench", cmd_bench, help=BENCH_HELP, description=BENCH_DESCRIPTION, overrides=True
    )
    add_config_arguments(bench, "the config to time (default: none, the built-in defaults)")
    _add_nproc(bench)
    bench.add_argument("--steps", type=positive_int, default=20, metavar="N", help="timed steps (20)")
    bench.add_argument(
        "--warmup", type=non_negative_int, default=5, metavar="N", help="untimed steps first (5)"
    )
    bench.add_argument(
        "--tokens", type=one_of("synthetic", "real"), default="synthetic", metavar="synthetic|real",
        help="synthetic tokens (default; no dataset needed) or the config's dataset",
    )  # fmt: skip
    bench.add_argument("--json-out", metavar="FILE", help="also append the JSON line to FILE")


def _layout(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"{text!r} is unknown; the only choice is 'auto'")
    return text


def _add_nproc(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc", type=positive_int, metavar="N",
        help="local worker processes to launch (default: the config's tp * pp * dp; ignored under torchrun)",
    )  # fmt: skip


def _interruptible(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Ctrl-C before the launcher or the training loop handles signals (while torch loads, say) ends the
    command quietly with status 130, as a later one does (threefold.reliability.control)."""

    @wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except KeyboardInterrupt:
            return 130

    return run


@_interruptible
def cmd_train(args: argparse.Namespace) -> int:
    from threefold.config.validate import check_world_size
    from threefold.launch import run_workers, world_from_env

    path, overrides, world = args.config_path, args.overrides, world_from_env()
    if args.layout == "auto":
        from threefold.plan.auto import NEUTRAL_LAYOUT, apply_layout, choose_layout

        overrides = [*overrides, *NEUTRAL_LAYOUT]
        neutral = load_run_config(path, overrides)
        layout = choose_layout(neutral, world=world, nproc=args.nproc)
        config = apply_layout(neutral, layout)
        overrides += layout.overrides()  # the re-executed workers get the layout as text
    else:
        config = load_run_config(path, overrides)
    _check_fits(config, world, args.nproc)
    if world is None:
        nproc = args.nproc or config.world_size
        check_world_size(config, nproc)  # before the data is prepared: a wrong --nproc costs nothing
        _check_before_launch(config, nproc)
    worker_argv = ["train", *([path] if path else []), *overrides]
    return run_workers(config, _train_body, world=world, nproc=args.nproc, worker_argv=worker_argv)


def _check_before_launch(config: Config, nproc: int) -> None:
    """What a local run's workers would each find wrong at start-up, found once, before any of them starts:
    the dataset (prepared first if asked; every token id scanned, as rank 0 would do again: from the page
    cache by then) and the GPUs. Under torchrun the workers check for themselves."""
    import torch

    from threefold.data.dataset import check_dataset
    from threefold.launch import prepare_data_if_asked

    wanted = config.training.device
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < nproc:
            raise ValueError(
                f"training.device = {wanted!r} needs a GPU for each of the {nproc} local workers, but "
                f"{visible} {'is' if visible == 1 else 'are'} visible"
            )
    prepare_data_if_asked(config)
    for source in config.data.datasets():
        check_dataset(source.path, model_vocab_size=config.model.vocab_size)


def _train_body(config: Config, mesh: Mesh, device: torch.device, faults: FaultPlan | None) -> int:
    from threefold.reliability.detectors import NumericsError
    from threefold.reliability.supervisor import NUMERICS_EXIT_CODE, USER_ERROR_EXIT_CODE, report_once
    from threefold.train import train

    try:
        result = train(config, mesh, device, faults=faults)
    except NumericsError as e:
        return report_once(f"threefold: {e}", NUMERICS_EXIT_CODE)
    except ValueError as e:  # every rank usually raises it alike (see reliability.supervisor)
        return report_once(f"threefold: error: {e}", USER_ERROR_EXIT_CODE)
    if mesh.rank == 0:
        val = result.val_losses
        summary = f"done: {result.steps_done} steps"
        if val:
            first, last = min(val), max(val)
            summary += f", validation loss {val[first]:.4f} (step {first})"
            if last != first:
                summary += f" -> {val[last]:.4f} (step {last})"
        if result.speed is not None:
            summary += f"; {result.speed.describe()}"
        print(f"{summary}; metrics and loss.png in {config.logging.out_dir}", flush=True)
    return 0


@_interruptible
def cmd_bench(args: argparse.Namespace) -> int:
    from threefold.config import build_config
    from threefold.launch import run_workers, world_from_env

    path, overrides = args.config_path, args.overrides
    check_paths = args.tokens == "real"  # synthetic tokens need no dataset on disk
    if path is not None:
        config = load_config(path, overrides, check_paths=check_paths)
    else:
        config = build_config({}, overrides, check_paths=check_paths)
    own = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--tokens={args.tokens}"]
    if args.json_out:
        own.append(f"--json-out={args.json_out}")
    world = world_from_env()
    _check_fits(config, world, args.nproc)
    worker_argv = ["bench", *([path] if path else []), *overrides, *own]
    body = partial(
        _bench_body, steps=args.steps, warmup=args.warmup, tokens=args.tokens, json_out=args.json_out
    )
    # log_layout=False: a benchmark leaves no files in logging.out_dir.
    return run_workers(config, body, world=world, nproc=args.nproc, worker_argv=worker_argv, log_layout=False)


def _check_fits(config: Config, world: WorldInfo | None, nproc: int | None) -> None:
    """Refuse a config that cannot fit in memory before any worker starts (see threefold.plan.fit)."""
    from threefold.plan.fit import check_fits

    per_node = world.local_world_size if world is not None else nproc or config.world_size
    check_fits(config, procs_per_node=per_node)


def _bench_body(
    config: Config, mesh: Mesh, device: torch.device, faults: FaultPlan | None, *, steps: int, warmup: int,
    tokens: str, json_out: str | None,
) -> int:  # fmt: skip
    from threefold.bench import format_record, run_bench, to_json
    from threefold.reliability.supervisor import USER_ERROR_EXIT_CODE, report_once

    try:
        record = run_bench(config, mesh, device, steps=steps, warmup=warmup, tokens=tokens)
    except ValueError as e:
        return report_once(f"threefold: error: {e}", USER_ERROR_EXIT_CODE)
    if record is None:
        return 0
    line = to_json(record)
    print(line, flush=True)
    print(format_record(record), flush=True)
    if json_out:
        with open(json_out, "a") as f:
            f.write(line + "\n")
    return 0
