"""The `threefold` command: train, data prepare, config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from importlib import resources
from pathlib import Path

DEFAULT_CONFIG = "default.toml"  # packaged: the tiny-Shakespeare CPU demo (tp=2, dp=2)

USAGE = """\
usage: threefold train [CONFIG.toml] [--section.key=value ...] [--nproc N] [--layout auto]
       threefold data prepare INPUT... --out DIR [--tokenizer tokenizer.json] [--val-fraction F]
       threefold data prepare --shakespeare --out DIR
       threefold bench [CONFIG.toml] [--section.key=value ...] [--nproc N] [--steps N] [--warmup N]
       threefold config [CONFIG.toml] [--section.key=value ...]   (print the resolved config)
       threefold config --reference                              (every key with its meaning)
       threefold schedule --pp 4 --v 2 -m 8 [--schedule gpipe|1f1b|interleaved]
       threefold plan --model PRESET|CONFIG.toml --gpus N [--gpus-per-node G]
                      [--gpu a100-80gb|h100|h200|FILE.json] --global-batch B --seq S [--json]
                      [--tp T --pp P --dp D --v V --micro-batch-size B --recompute R --zero on|off]
                      (the fastest layouts that fit, predicted)
       threefold plan --calibrate [--out FILE.json]        (measure this machine as a --gpu preset)
       threefold import-hf HF_DIR CHECKPOINT_DIR      (Llama-family / GPT-2 safetensors -> threefold)
       threefold export-hf CHECKPOINT_DIR HF_DIR [--dtype float32|bfloat16]
       threefold checkpoint convert CHECKPOINT_DIR OUT_DIR  (any layout -> one file of full tensors)

With no CONFIG, `threefold train` runs the packaged demo: the tiny Llama preset on Shakespeare,
4 CPU processes (tp=2, dp=2). Started outside torchrun it launches its own workers; under torchrun
(or srun with torchrun) each process is one rank.
"""


def _split_train_args(argv: list[str]) -> tuple[str | None, list[str], int | None]:
    path, overrides, nproc = None, [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg == "--nproc":
            if i + 1 >= len(argv):
                raise ValueError("--nproc needs a number")
            nproc = _positive_int("--nproc", argv[i + 1])
            i += 2
            continue
        if arg.startswith("--nproc="):
            nproc = _positive_int("--nproc", arg.split("=", 1)[1])
        elif arg.startswith("--"):
            overrides.append(arg)
        elif path is None:
            path = arg
        else:
            raise ValueError(
                f"unexpected argument {arg!r}: one config file at most, then --section.key=value"
            )
        i += 1
    return path, overrides, nproc


def _positive_int(name: str, text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return int(text)


def _load(path: str | None, overrides: list[str], *, check_paths: bool = True):
    from threefold.config import build_config, load_config

    if path is not None:
        return load_config(path, overrides, check_paths=check_paths)
    import tomllib

    raw = tomllib.loads(resources.files("threefold").joinpath(DEFAULT_CONFIG).read_text())
    return build_config(raw, overrides, check_paths=check_paths)


def _pop_layout(argv: list[str]) -> tuple[list[str], str | None]:
    """Take `--layout auto` (or `--layout=auto`) out of the train arguments."""
    rest, layout = [], None
    i = 0
    while i < len(argv):
        if argv[i] == "--layout":
            if i + 1 >= len(argv):
                raise ValueError("--layout needs a value: auto")
            layout, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--layout="):
            layout = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    if layout is not None and layout != "auto":
        raise ValueError(f"--layout {layout!r} is unknown; the only choice is 'auto'")
    return rest, layout


def _auto_layout_overrides(path: str | None, overrides: list[str], nproc: int | None, world) -> list[str]:
    """`--layout auto`: plan for this world and return the overrides that set the chosen layout."""
    import os

    import torch

    from threefold.plan.cli import auto_layout, host_hardware
    from threefold.plan.hardware import preset_for_device

    neutral = ["--parallel.tp_size=1", "--parallel.pp_size=1", "--parallel.dp_size=1",
               "--parallel.num_model_chunks=1", "--parallel.pipeline_schedule=1f1b",
               "--training.micro_batch_size=1"]  # fmt: skip
    config = _load(path, overrides + neutral)
    use_cuda = config.training.device == "cuda" or (
        config.training.device == "auto" and torch.cuda.is_available()
    )
    if world is not None:
        world_size = world.world_size
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    elif nproc is not None:
        world_size = per_node = nproc
    elif use_cuda:
        world_size = per_node = torch.cuda.device_count()
    else:
        raise ValueError("--layout auto on CPU needs --nproc N (how many processes to plan for)")
    hw = (preset_for_device(torch.cuda.get_device_name()) if use_cuda else None) or host_hardware(per_node)
    layout = auto_layout(config, world_size=world_size, gpus_per_node=per_node, hw=hw)
    if world is None or world.rank == 0:
        print(f"--layout auto on {world_size} x {hw.name}: {layout.label()}", flush=True)
    return neutral + layout.overrides()


def _run_workers(config, worker_argv: list[str], nproc: int | None, body) -> int:
    """Outside torchrun: launch the workers running `threefold <worker_argv>`. Inside: return
    body(config, mesh, device, faults) on this rank (an exit code), with the process group up."""
    import torch

    from threefold.config import check_world_size
    from threefold.launch import init_distributed, launch_local, pick_device, world_from_env
    from threefold.reliability.faults import faults_from_env

    world = world_from_env()
    faults = faults_from_env()  # test-only fault injection (THREEFOLD_FAULT); None normally
    if world is None:
        nproc = nproc or config.world_size
        check_world_size(config, nproc)
        _prepare_data_if_asked(config)
        use_cuda = config.training.device == "cuda" or (
            config.training.device == "auto" and torch.cuda.is_available()
        )
        return launch_local(nproc, worker_argv, use_cuda=use_cuda)

    check_world_size(config, world.world_size)
    import torch.distributed as dist

    from threefold.parallel.mesh import build_mesh

    device = pick_device(config, world.local_rank)
    init_distributed(world, device)
    try:
        if world.local_rank == 0:
            _prepare_data_if_asked(config)  # torchrun multi-node: once per node
        dist.barrier()
        p = config.parallel
        return body(config, build_mesh(p.tp_size, p.dp_size, p.pp_size), device, faults)
    finally:
        dist.destroy_process_group()


def cmd_train(argv: list[str]) -> int:
    from threefold.launch import world_from_env

    argv, layout = _pop_layout(argv)
    path, overrides, nproc = _split_train_args(argv)
    if layout == "auto":
        overrides = overrides + _auto_layout_overrides(path, overrides, nproc, world_from_env())
    config = _load(path, overrides)

    def body(config, mesh, device, faults) -> int:
        from threefold.reliability.detectors import NumericsError
        from threefold.train import train

        try:
            result = train(config, mesh, device, faults=faults)
        except NumericsError as e:
            print(f"threefold: rank {mesh.rank}: {e}", file=sys.stderr, flush=True)
            return 3
        if mesh.rank == 0:
            val = result.val_losses
            summary = f"done: {result.steps_done} steps"
            if val:
                first, last = min(val), max(val)
                summary += f", validation loss {val[first]:.4f} (step {first})"
                if last != first:
                    summary += f" -> {val[last]:.4f} (step {last})"
            print(f"{summary}; metrics and loss.png in {config.logging.out_dir}", flush=True)
        return 0

    return _run_workers(config, ["train", *([path] if path else []), *overrides], nproc, body)


BENCH_USAGE = """\
usage: threefold bench [CONFIG.toml] [--section.key=value ...] [--nproc N]
                       [--steps N] [--warmup N] [--tokens synthetic|real] [--json-out FILE]

Times the training step of a config (default: no file, so give at least --model.preset) and prints one
JSON line plus a table: tokens/s/GPU, TFLOP/s, MFU, step-time median and spread, peak memory per rank.
Defaults: 20 timed steps after 5 warm-up steps, synthetic tokens (no dataset needed).
"""


def cmd_bench(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(BENCH_USAGE)
        return 0
    own = {"--steps": "20", "--warmup": "5", "--tokens": "synthetic", "--json-out": ""}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        key, equals, value = argv[i].partition("=")
        if key in own:
            if not equals:
                if i + 1 >= len(argv):
                    raise ValueError(f"{key} needs a value")
                value = argv[i + 1]
                i += 1
            own[key] = value
        else:
            rest.append(argv[i])
        i += 1
    steps = _positive_int("--steps", own["--steps"])
    warmup = int(own["--warmup"]) if own["--warmup"].isdigit() else _positive_int("--warmup", own["--warmup"])
    if own["--tokens"] not in ("synthetic", "real"):
        raise ValueError(f"--tokens must be 'synthetic' or 'real', got {own['--tokens']!r}")
    path, overrides, nproc = _split_train_args(rest)
    from threefold.config import build_config, load_config

    check_paths = own["--tokens"] == "real"
    if path is not None:
        config = load_config(path, overrides, check_paths=check_paths)
    else:
        config = build_config({}, overrides, check_paths=check_paths)

    def body(config, mesh, device, faults) -> int:
        from threefold.bench import format_record, run_bench, to_json

        record = run_bench(config, mesh, device, steps=steps, warmup=warmup, tokens=own["--tokens"])
        if record is None:
            return 0
        line = to_json(record)
        print(line, flush=True)
        print(format_record(record), flush=True)
        if own["--json-out"]:
            with open(own["--json-out"], "a") as f:
                f.write(line + "\n")
        return 0

    worker_argv = ["bench", *([path] if path else []), *overrides]
    worker_argv += [f"{k}={v}" for k, v in own.items() if v]
    return _run_workers(config, worker_argv, nproc, body)


def _prepare_data_if_asked(config) -> None:
    d = config.data
    if d.prepare_shakespeare and not (Path(d.path) / "meta.json").is_file():
        from threefold.data.prepare import prepare_shakespeare

        print(f"preparing the Shakespeare dataset in {d.path} (first run only)", flush=True)
        prepare_shakespeare(d.path)


def cmd_config(argv: list[str]) -> int:
    from threefold.config import describe_fields

    if "--reference" in argv:
        print(describe_fields())
        return 0
    import json

    path, overrides, _ = _split_train_args(argv)
    config = _load(path, overrides, check_paths=False)
    print(json.dumps(config.to_dict(), indent=2))
    return 0


def cmd_schedule(argv: list[str]) -> int:
    """Print a pipeline schedule's timeline and its simulated bubble and memory."""
    parser = argparse.ArgumentParser(prog="threefold schedule", description=cmd_schedule.__doc__)
    parser.add_argument("--pp", type=int, default=4, help="pipeline-parallel size p")
    parser.add_argument("--v", type=int, default=1, help="model chunks per rank (interleaving)")
    parser.add_argument("-m", "--microbatches", type=int, default=8, help="micro-batches per step")
    parser.add_argument("--schedule", choices=["gpipe", "1f1b", "interleaved"], default=None,
                        help="default: interleaved when --v > 1, else 1f1b")  # fmt: skip
    parser.add_argument("--forward-cost", type=float, default=1.0)
    parser.add_argument("--backward-cost", type=float, default=1.0)
    args = parser.parse_args(argv)
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


def _checkpoint_path(arg: str) -> Path:
    """A checkpoint directory as given, or the one `latest` points to in a run's checkpoint.dir."""
    from threefold.checkpoint import latest_checkpoint

    path = Path(arg)
    if not (path / "manifest.json").is_file() and (path / "latest").is_file():
        return latest_checkpoint(path) or path
    return path


def cmd_checkpoint(argv: list[str]) -> int:
    """Checkpoint tools: `convert` consolidates a checkpoint of any layout into one file of full tensors."""
    parser = argparse.ArgumentParser(prog="threefold checkpoint", description=cmd_checkpoint.__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    convert = sub.add_parser("convert", help="write a checkpoint of any layout as one layout-free file")
    convert.add_argument("src", help="a checkpoint directory, or a run's checkpoint.dir (uses latest)")
    convert.add_argument("dst", help="the consolidated checkpoint to write")
    args = parser.parse_args(argv)
    from threefold.checkpoint import convert_checkpoint

    src = _checkpoint_path(args.src)
    out = convert_checkpoint(src, args.dst)
    print(f"wrote {out} from {src}: full weights and optimizer state in one file, loadable under any layout")
    return 0


def cmd_plan(argv: list[str]) -> int:
    """Rank the layouts that fit by predicted speed (see threefold.plan.search), or calibrate a GPU preset."""
    from threefold.plan.cli import main as plan_main

    return plan_main(argv)


def _toml_table(name: str, values: dict) -> str:
    lines = [f"[{name}]"]
    for key, value in values.items():
        if value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def cmd_import_hf(argv: list[str]) -> int:
    """Turn a Hugging Face checkpoint (safetensors + config.json) into a threefold checkpoint."""
    parser = argparse.ArgumentParser(prog="threefold import-hf", description=cmd_import_hf.__doc__)
    parser.add_argument("hf_dir", help="directory with config.json and model.safetensors (or an index)")
    parser.add_argument("out_dir", help="the threefold checkpoint to write")
    args = parser.parse_args(argv)
    from threefold.checkpoint import write_full_checkpoint
    from threefold.config import Config
    from threefold.model.hf import load_hf_checkpoint

    model, state = load_hf_checkpoint(args.hf_dir)
    out = write_full_checkpoint(Config(model=model), state, args.out_dir)
    fields = {k: v for k, v in dataclasses.asdict(model).items() if k != "preset"}
    (out / "model.toml").write_text(_toml_table("model", fields))
    print(f"wrote {out} ({sum(t.numel() for t in state.values()):,} parameters)")
    print(f"train from it with this model section (also in {out / 'model.toml'}) and")
    print(f'[checkpoint]\nload = "{out}"\n')
    print(_toml_table("model", fields))
    return 0


def cmd_export_hf(argv: list[str]) -> int:
    """Write a threefold checkpoint (any layout) as a Hugging Face checkpoint."""
    parser = argparse.ArgumentParser(prog="threefold export-hf", description=cmd_export_hf.__doc__)
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run's checkpoint.dir (uses latest)")
    parser.add_argument("out_dir", help="where to write config.json and model.safetensors")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="split the weights into files this big"
    )
    args = parser.parse_args(argv)
    import torch

    from threefold.checkpoint import read_full_state
    from threefold.config import ModelConfig
    from threefold.model.hf import save_hf_checkpoint, to_hf_state_dict

    path = _checkpoint_path(args.checkpoint)
    model_fields, state = read_full_state(path)
    model = ModelConfig(**model_fields)
    state = {k: v.to(getattr(torch, args.dtype)) for k, v in state.items()}
    to_hf_state_dict(model, state)  # checks names and shapes before anything is written
    save_hf_checkpoint(model, state, args.out_dir, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {args.out_dir} from {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            return cmd_train(rest)
        if command == "data" and rest[:1] == ["prepare"]:
            from threefold.data.prepare import prepare_main

            return prepare_main(rest[1:])
        if command == "plan":
            return cmd_plan(rest)
        if command == "checkpoint":
            return cmd_checkpoint(rest)
        if command == "bench":
            return cmd_bench(rest)
        if command == "config":
            return cmd_config(rest)
        if command == "schedule":
            return cmd_schedule(rest)
        if command == "import-hf":
            return cmd_import_hf(rest)
        if command == "export-hf":
            return cmd_export_hf(rest)
        if command in ("-h", "--help", "help"):
            print(USAGE)
            return 0
        print(USAGE, file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"threefold: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
