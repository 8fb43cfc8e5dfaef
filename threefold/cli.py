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
usage: threefold train [CONFIG.toml] [--section.key=value ...] [--nproc N]
       threefold data prepare INPUT... --out DIR [--tokenizer tokenizer.json] [--val-fraction F]
       threefold data prepare --shakespeare --out DIR
       threefold config [CONFIG.toml] [--section.key=value ...]   (print the resolved config)
       threefold config --reference                              (every key with its meaning)
       threefold schedule --pp 4 --v 2 -m 8 [--schedule gpipe|1f1b|interleaved]
       threefold import-hf HF_DIR CHECKPOINT_DIR      (Llama-family / GPT-2 safetensors -> threefold)
       threefold export-hf CHECKPOINT_DIR HF_DIR [--dtype float32|bfloat16]

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


def cmd_train(argv: list[str]) -> int:
    import torch

    from threefold.config import check_world_size
    from threefold.faults import faults_from_env
    from threefold.launch import init_distributed, launch_local, pick_device, world_from_env

    path, overrides, nproc = _split_train_args(argv)
    config = _load(path, overrides)
    world = world_from_env()
    faults = faults_from_env()  # test-only fault injection (THREEFOLD_FAULT); None normally
    if world is None:
        nproc = nproc or config.world_size
        check_world_size(config, nproc)
        _prepare_data_if_asked(config)
        use_cuda = config.training.device == "cuda" or (
            config.training.device == "auto" and torch.cuda.is_available()
        )
        worker_argv = ["train", *([path] if path else []), *overrides]
        return launch_local(nproc, worker_argv, use_cuda=use_cuda)

    check_world_size(config, world.world_size)
    import torch.distributed as dist

    from threefold.guard import NumericsError
    from threefold.mesh import build_mesh
    from threefold.train import train

    device = pick_device(config, world.local_rank)
    init_distributed(world, device)
    try:
        if world.local_rank == 0:
            _prepare_data_if_asked(config)  # torchrun multi-node: once per node
        dist.barrier()
        p = config.parallel
        mesh = build_mesh(p.tp_size, p.dp_size, p.pp_size)
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
    finally:
        dist.destroy_process_group()
    return 0


def _prepare_data_if_asked(config) -> None:
    d = config.data
    if d.prepare_shakespeare and not (Path(d.path) / "meta.json").is_file():
        from threefold.prepare import prepare_shakespeare

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
    from threefold.pipeline_sim import simulate, timeline
    from threefold.schedules import build_schedule

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
    from threefold.hf import load_hf_checkpoint

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

    from threefold.checkpoint import latest_checkpoint, read_full_state
    from threefold.config import ModelConfig
    from threefold.hf import save_hf_checkpoint, to_hf_state_dict

    path = Path(args.checkpoint)
    if not (path / "manifest.json").is_file() and (path / "latest").is_file():
        path = latest_checkpoint(path) or path
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
            from threefold.prepare import prepare_main

            return prepare_main(rest[1:])
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
