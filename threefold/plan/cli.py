"""`threefold plan`: the fastest layouts that fit, as a table or JSON; `--calibrate` measures a preset;
and the planner entry points of `threefold train --layout auto` (`auto_layout`, `host_hardware`; the
command side lives in plan/auto.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from threefold.config import Config, ModelConfig, load_config
from threefold.pipeline.schedules import SCHEDULES
from threefold.plan.hardware import PRESETS, Hardware, load_hardware, save_hardware
from threefold.plan.layout import Layout, Workload
from threefold.plan.search import PlanResult, explain, explain_terms, format_table, plan
from threefold.plan.time_model import EAGER, Kernels, estimate_layout_time
from threefold.presets import MODEL_PRESETS

DESCRIPTION = """Predict memory and speed of every (tp, pp, dp, v, micro-batch, schedule, recompute, ZeRO)
layout; print the fastest that fit. With --calibrate: measure this machine and save it as a --gpu preset."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `threefold plan` (the top-level parser in threefold/cli.py calls this)."""
    p.add_argument(
        "--model",
        metavar="PRESET|FILE.toml",
        help="a preset name or a config .toml (its model, seq_len, batch, dtype)",
    )
    p.add_argument("--gpus", type=int, metavar="N", help="number of GPUs n")
    p.add_argument(
        "--gpus-per-node", type=int, metavar="G", help="GPUs per node g (default: all in one node)"
    )
    p.add_argument(
        "--gpu",
        default="h100",
        metavar="NAME|FILE.json",
        help=f"hardware: {', '.join(PRESETS)} or a preset .json",
    )
    p.add_argument("--global-batch", type=int, metavar="B", help="global batch B in sequences")
    p.add_argument("--seq", type=int, metavar="S", help="sequence length s")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default bfloat16")
    p.add_argument("--json", action="store_true", help="print the ranked layouts as JSON")
    p.add_argument("--top", type=int, default=10, metavar="K", help="how many layouts to show")
    p.add_argument(
        "--memory-margin", type=float, default=0.05, metavar="F", help="headroom kept free (fraction)"
    )
    p.add_argument(
        "--no-zero",
        action="store_true",
        help="do not consider the distributed optimizer (ZeRO) nor optimizer offload",
    )
    for name in ("tp", "cp", "pp", "dp", "v"):
        p.add_argument(f"--{name}", type=int, help=f"fix {name}")
    p.add_argument("--micro-batch-size", type=int, metavar="B", help="fix the micro-batch size b")
    p.add_argument("--recompute", choices=["none", "selective", "full"], help="fix recomputation")
    p.add_argument("--zero", choices=["on", "off"], help="fix ZeRO-1 on or off")
    p.add_argument("--schedule", choices=list(SCHEDULES), help="fix the pipeline schedule")
    p.add_argument("--calibrate", action="store_true", help="measure this machine and save a preset")
    p.add_argument(
        "--validate",
        action="store_true",
        help="predict every published and measured result in plan/validation.json; print the errors",
    )
    p.add_argument(
        "--explain", action="store_true", help="print the best layout's step time term by term, with sources"
    )
    p.add_argument("--compiled", action="store_true", help="predict for torch.compile (fused element-wise)")
    p.add_argument(
        "--fp8", choices=["tensorwise", "rowwise"], help="predict for float8 linears (training.fp8)"
    )
    p.add_argument(
        "--fp8-output-layer",
        action="store_true",
        help="with --fp8: the output layer's GEMMs in float8 too (training.fp8_output_layer)",
    )
    p.add_argument(
        "--out", default="hardware.json", metavar="FILE.json", help="where --calibrate writes its preset"
    )


def _workload(args: argparse.Namespace) -> Workload:
    if args.model is None:
        raise ValueError("--model is required (a preset name or a config .toml)")
    seq, batch, dtype = args.seq, args.global_batch, args.dtype
    if args.model in MODEL_PRESETS:
        model = ModelConfig(preset=args.model, **MODEL_PRESETS[args.model])
    elif args.model.endswith(".toml"):
        config = load_config(args.model, check_paths=False)
        model = config.model
        seq = seq or config.data.seq_len
        batch = batch or config.training.global_batch_size
        dtype = dtype or config.training.dtype
    else:
        raise ValueError(
            f"--model {args.model!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a .toml"
        )
    if seq is None or batch is None:
        raise ValueError("--seq and --global-batch are required with a preset model")
    for flag, value in (("--seq", seq), ("--global-batch", batch)):
        if value <= 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if seq > model.max_seq_len:
        raise ValueError(f"--seq ({seq}) exceeds model.max_seq_len ({model.max_seq_len}) of {args.model}")
    return Workload(model=model, seq_len=seq, global_batch_size=batch, dtype=dtype or "bfloat16")


def _kernels(args: argparse.Namespace) -> Kernels:
    """The software planned for: --compiled, --fp8 and --fp8-output-layer, and where --model is a config
    file, what its training section says (training.compile, training.fp8, training.fp8_output_layer,
    training.fp8_weight_cache) unless those flags say more."""
    compiled, fp8, output, cache = args.compiled, args.fp8, args.fp8_output_layer, True
    if args.model.endswith(".toml"):
        training = load_config(args.model, check_paths=False).training
        compiled = compiled or training.compile
        fp8 = fp8 or training.fp8 or None
        output = output or training.fp8_output_layer
        cache = training.fp8_weight_cache
    if output and fp8 is None:
        raise ValueError("--fp8-output-layer needs --fp8 (or training.fp8 in the config file)")
    return Kernels(compiled=compiled, fp8=fp8, fp8_output_layer=output, fp8_weight_cache=cache)


FLAGS = {"tp": "tp_size", "cp": "cp_size", "pp": "pp_size", "dp": "dp_size", "v": "num_model_chunks",
         "micro_batch_size": "micro_batch_size"}  # fmt: skip
"""The integer flags that fix a setting, by argparse name: the Config field each fixes."""


def _fixed(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags fix, by Config field name (the keys `plan(fixed=...)` takes)."""
    fixed: dict[str, Any] = {}
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            if value <= 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")
            fixed[key] = value
    if args.recompute is not None:
        fixed["recompute"] = args.recompute
    if args.zero is not None:
        fixed["zero"] = args.zero == "on"
    if args.schedule is not None:
        fixed["pipeline_schedule"] = args.schedule
    return fixed


def _check_fixed(fixed: dict[str, Any], num_gpus: int, w: Workload) -> None:
    """Name the factors when a fixed dimension cannot work at all."""
    for flag in ("tp", "cp", "pp", "dp"):
        key = FLAGS[flag]
        if key in fixed and num_gpus % fixed[key]:
            raise ValueError(f"--{flag} ({fixed[key]}) must divide --gpus ({num_gpus})")
    tp_size, pp_size, dp_size = (fixed.get(k, 1) for k in ("tp_size", "pp_size", "dp_size"))
    cp_size = fixed.get("cp_size", 1)
    if {
        "tp_size",
        "pp_size",
        "dp_size",
    } <= fixed.keys() and tp_size * cp_size * pp_size * dp_size != num_gpus:
        cp = f" * --cp ({cp_size})" if "cp_size" in fixed else ""
        raise ValueError(
            f"--tp ({tp_size}){cp} * --pp ({pp_size}) * --dp ({dp_size}) = "
            f"{tp_size * cp_size * pp_size * dp_size} != --gpus ({num_gpus})"
        )
    if "tp_size" in fixed and w.model.num_heads % tp_size:
        raise ValueError(f"--tp ({tp_size}) must divide the model's num_heads ({w.model.num_heads})")


def run_plan(
    w: Workload, hw: Hardware, *, num_gpus: int, gpus_per_node: int, fixed: dict[str, Any], margin: float,
    allow_zero: bool, kernels: Kernels = EAGER,
) -> PlanResult:  # fmt: skip
    """Plan, or raise ValueError saying why nothing fits."""
    if num_gpus <= 0 or gpus_per_node <= 0:
        raise ValueError(f"--gpus ({num_gpus}) and --gpus-per-node ({gpus_per_node}) must be positive")
    if num_gpus > gpus_per_node and num_gpus % gpus_per_node:
        raise ValueError(f"--gpus ({num_gpus}) must be a multiple of --gpus-per-node ({gpus_per_node})")
    if not 0 <= margin < 1:
        raise ValueError(f"--memory-margin must lie in [0, 1), got {margin}")
    _check_fixed(fixed, num_gpus, w)
    result = plan(
        w, hw, num_gpus=num_gpus, gpus_per_node=gpus_per_node, fixed=fixed, memory_margin=margin,
        allow_zero=allow_zero, kernels=kernels,
    )  # fmt: skip
    if not result.ranked:
        what = f"{w.model.preset or 'the model'} (seq {w.seq_len}, global batch {w.global_batch_size})"
        where = f"{num_gpus} x {hw.name} ({result.capacity_bytes / 2**30:.1f} GiB usable each)"
        fixed_text = f" with {fixed}" if fixed else ""
        if result.too_big:
            small = result.too_big[0]
            raise ValueError(
                f"no layout of {what} fits on {where}{fixed_text}; the smallest, {small.layout.label()}, "
                f"needs {small.memory.total / 2**30:.1f} GiB"
            )
        raise ValueError(f"no valid layout of {what} on {num_gpus} GPUs{fixed_text}")
    return result


def run(args: argparse.Namespace) -> int:
    """Print the ranked layouts (or calibrate) for parsed `threefold plan` arguments."""
    if args.calibrate:
        return _calibrate(args)
    if args.validate:
        from threefold.plan.validate import format_report, load_rows, validate

        print(format_report(validate(), load_rows()[0]))
        return 0
    if args.gpus is None:
        raise ValueError("--gpus is required")
    w = _workload(args)
    hw = load_hardware(args.gpu)
    gpus_per_node = args.gpus_per_node or args.gpus
    kernels = _kernels(args)
    result = run_plan(
        w, hw, num_gpus=args.gpus, gpus_per_node=gpus_per_node, fixed=_fixed(args), margin=args.memory_margin,
        allow_zero=not args.no_zero, kernels=kernels,
    )  # fmt: skip
    top = result.ranked[: max(1, args.top)]
    if args.json:
        print(json.dumps([c.as_dict() for c in top], indent=1))
        return 0
    print(
        f"{w.model.preset or args.model}: seq {w.seq_len}, global batch {w.global_batch_size}, {w.dtype}; "
        f"{args.gpus} x {hw.name} ({gpus_per_node} per node); {len(result.ranked)} layouts fit, "
        f"{len(result.too_big)} do not"
    )
    print(format_table(top, hw))
    print()
    print("\n".join(explain(result)))
    hint = float8_outlook(w, result.ranked[0].layout, hw, gpus_per_node, kernels)
    if hint:
        print(hint)
    if args.explain:
        print()
        print("\n".join(explain_terms(result.ranked[0], hw)))
    print(f"\nrun the best:\n  {best_command(args, w, result.ranked[0].layout, gpus_per_node)}")
    return 0


def float8_outlook(w: Workload, layout: Layout, hw: Hardware, gpus_per_node: int, kernels: Kernels) -> str:
    """What float8 linears would give `layout` on float8 hardware, when the plan is for bf16 without them:
    each recipe's predicted speed-up, and which one kept the loss (README, "FP8 training"); else ''."""
    if not hw.float8 or kernels.fp8 is not None or w.dtype != "bfloat16":
        return ""

    def step(k: Kernels) -> float:
        return estimate_layout_time(w, layout, hw, gpus_per_node=gpus_per_node, kernels=k).step

    def gains(k: Kernels) -> str:
        base = step(k)
        recipes = ("rowwise", "tensorwise")
        return ", ".join(f"{r} {base / step(dataclasses.replace(k, fp8=r)):.2f}x" for r in recipes)

    where = layout.label()
    if not kernels.compiled:  # float8's casts fuse only compiled: say what it gives there too
        compiled = gains(dataclasses.replace(kernels, compiled=True))
        where += f" uncompiled; {compiled} compiled (--compiled, training.compile = true)"
    return (
        f"float8 linears (training.fp8; plan them with --fp8): {gains(kernels)} predicted for {where}; "
        "rowwise kept llama-1b's loss within 1% of bf16's, tensorwise did not (README)"
    )


def best_command(args: argparse.Namespace, w: Workload, layout: Layout, gpus_per_node: int) -> str:
    """The whole command that trains `layout`: the workload as planned (model, sequence, batch, dtype), the
    layout, and the launcher (`--nproc` on one node, torchrun on each node of several)."""
    if args.model in MODEL_PRESETS:
        workload = [
            f"--model.preset={args.model}", f"--data.seq_len={w.seq_len}",
            f"--training.global_batch_size={w.global_batch_size}", f"--training.dtype={w.dtype}",
        ]  # fmt: skip
    else:  # a config file: it holds the rest; what the flags changed is spelled out
        workload = [args.model]
        changed = (
            ("seq", "data.seq_len", w.seq_len),
            ("dtype", "training.dtype", w.dtype),
            ("global_batch", "training.global_batch_size", w.global_batch_size),
        )
        for flag, key, value in changed:
            if getattr(args, flag) is not None:
                workload.append(f"--{key}={value}")
    kernels = [f"--training.compile={str(args.compiled).lower()}"] if args.compiled else []
    kernels += [f"--training.fp8={args.fp8}"] if args.fp8 else []
    kernels += ["--training.fp8_output_layer=true"] if args.fp8_output_layer else []
    train = " ".join(["train", *workload, *layout.overrides(), *kernels])
    if args.gpus <= gpus_per_node:
        return f"threefold {train} --nproc {args.gpus}"
    nodes = args.gpus // gpus_per_node
    return (
        f"torchrun --nnodes {nodes} --nproc-per-node {gpus_per_node} --rdzv-backend c10d "
        f"--rdzv-endpoint HOST0:29500 -m threefold {train}   # on each of the {nodes} nodes"
    )


def _calibrate(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from threefold.launch import init_distributed, launch_local, world_from_env
    from threefold.plan.calibrate import calibrate

    world = world_from_env()
    name = Path(args.out).stem
    if world is None and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        argv = ["plan", "--calibrate", "--out", args.out]
        return launch_local(torch.cuda.device_count(), argv, use_cuda=True)
    if world is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        hw = calibrate(device, name=name)
    else:
        device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        init_distributed(world, device)
        try:
            hw = calibrate(device, name=name, intra_node=world.local_world_size >= world.world_size)
        finally:
            dist.destroy_process_group()
        if world.rank != 0:
            return 0
    save_hardware(hw, args.out)
    print(json.dumps(hw.to_dict(), indent=1))
    print(f"saved {args.out}; use it with `threefold plan --gpu {args.out} ...`")
    return 0


def auto_layout(config: Config, *, world_size: int, gpus_per_node: int, hw: Hardware) -> Layout:
    """The planner's best layout for `config`'s model and batch on `world_size` ranks (--layout auto)."""
    w = Workload(
        model=config.model,
        seq_len=config.data.seq_len,
        global_batch_size=config.training.global_batch_size,
        dtype=config.training.dtype,
    )
    result = run_plan(
        w, hw, num_gpus=world_size, gpus_per_node=min(gpus_per_node, world_size), fixed={}, margin=0.05,
        allow_zero=True,
    )  # fmt: skip
    return result.ranked[0].layout


def host_hardware(num_procs: int) -> Hardware:
    """A rough preset for CPU ranks: each gets 1/num_procs of the host memory (speed is only relative)."""
    from threefold.plan.calibrate import _host_memory_gib

    return dataclasses.replace(
        PRESETS["h100"], name="cpu", memory_gib=_host_memory_gib() / max(1, num_procs), memory_reserve_gib=0.5
    )
