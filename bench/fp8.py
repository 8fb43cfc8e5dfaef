"""FP8 against bf16 on one GPU: llama-1b, seq 2048, torch.compile, micro-batch 8 and 4; tokens/s
through threefold's bench path (`run_bench`: the real training step, CUDA-event timing), and a loss
check from the micro-batch-8 runs (50 steps each, same data and seed).

Usage (one H200, from the repo root; a prepared dataset makes the loss check use real text):
    PYTHONPATH=. python bench/fp8.py [--data data/shakespeare] [--budget 160]
(bench/fp8.sh runs the fp8 GPU tests first, then this.) Each run is one compile plus 5 warm-up steps and
45 timed steps (micro-batch 8) or 20 (micro-batch 4), in one process, in the order of RUNS (tensorwise,
the faster recipe, before rowwise), skipping any run that would start past --budget seconds. Prints a
line per run as it finishes, then the table and the loss comparison; with $OUT set, also writes each
run's record (bench JSON, losses included) to $OUT/fp8.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from threefold import adamw
from threefold.bench import run_bench
from threefold.config import build_config
from threefold.parallel import layers
from threefold.parallel.mesh import build_mesh

MODES: list[Any] = [False, "tensorwise", "rowwise"]
RUNS = [(8, False, 5, 45), (8, "tensorwise", 5, 45), (4, False, 5, 20), (4, "tensorwise", 5, 20),
        (8, "rowwise", 5, 45), (4, "rowwise", 5, 20)]  # fmt: skip
"""(micro-batch, fp8, warm-up steps, timed steps): the micro-batch-8 runs give the 50-step loss curves."""


TORCH_ADAMW = "bf16, torch AdamW"
"""The mode of the --compare-update runs: bf16 with optimizer.fused_update = false (torch's fused AdamW,
then the copy into the weights), the step as it was before 2026-12-04."""


def config_for(
    micro_batch: int,
    fp8: Any,
    steps: int,
    data: str | None,
    model: dict[str, Any] | None = None,
    attention: str = "auto",
) -> Any:
    """One run's config; `model` overrides the model section (default llama-1b)."""
    raw: dict[str, dict[str, Any]] = {
        "model": model or {"preset": "llama-1b"},
        "data": {"seq_len": 2048} | ({"path": data} if data else {}),
        "optimizer": {"warmup_steps": 5, "fused_update": fp8 != TORCH_ADAMW},
        "training": {
            "dtype": "bfloat16", "device": "cuda", "compile": True,
            "fp8": fp8 if fp8 != TORCH_ADAMW else False, "max_steps": steps,
            "micro_batch_size": micro_batch, "global_batch_size": micro_batch, "eval_interval": 0,
            "attention_backend": attention,
        },
        "logging": {"progress": False, "tensorboard": False, "plot": False},
    }  # fmt: skip
    return build_config(raw, check_paths=data is not None)


def mode_named(name: str) -> Any:
    """The fp8 mode a --modes entry names ("false" for bf16)."""
    mode = {"false": False, "bf16": False}.get(name.strip(), name.strip())
    if mode not in MODES:
        raise SystemExit(f"--modes: {name!r} is none of false, tensorwise, rowwise")
    return mode


def inductor_settings(text: str) -> dict[str, Any]:
    """`--inductor`'s "key=value,..." as torch._inductor.config settings: true/false, numbers, else text
    (e.g. "max_autotune_gemm=true,max_autotune_gemm_backends=ATEN+TRITON,triton.multi_kernel=1"; '+'
    stands for a comma)."""
    import torch._inductor.config as inductor

    settings: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise SystemExit(f"--inductor: {item!r} is not key=value")
        if key not in inductor.get_config_copy():  # dotted for the sub-sections: triton.multi_kernel
            raise SystemExit(f"--inductor: torch._inductor.config has no setting {key!r}")
        value: Any = {"true": True, "false": False}.get(raw.lower(), raw.replace("+", ","))
        if isinstance(value, str):
            for kind in (int, float):
                try:
                    value = kind(value)
                    break
                except ValueError:
                    pass
        settings[key] = value
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/shakespeare", help="prepared dataset (else synthetic tokens)")
    parser.add_argument("--budget", type=float, default=160.0, help="start no run after this many seconds")
    parser.add_argument(
        "--compare-update",
        action="store_true",
        help="also bf16 with torch's AdamW (optimizer.fused_update = false), first",
    )
    parser.add_argument(
        "--modes",
        default="false,tensorwise,rowwise",
        help="which of false (bf16), tensorwise, rowwise to run, comma-separated",
    )
    parser.add_argument(
        "--micro-batches", default="8,4", help="which micro-batch sizes to run, comma-separated"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps of every run (default: RUNS')")
    parser.add_argument(
        "--model",
        default="llama-1b",
        help="model preset (e.g. llama-8b with --num-layers 8: a wider model that fits one GPU)",
    )
    parser.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument(
        "--one-launch-adamw",
        action="store_true",
        help="the optimizer's update in one kernel launch (threefold.adamw.ONE_LAUNCH)",
    )
    parser.add_argument(
        "--stack-projections",
        action="store_true",
        help="q/k/v and gate/up as one GEMM each (threefold.parallel.layers.STACK_PROJECTIONS)",
    )
    parser.add_argument(
        "--attention-backend",
        default="auto",
        help="training.attention_backend of every run (e.g. fa4: FlashAttention-4)",
    )
    parser.add_argument(
        "--inductor",
        default="",
        help="torch._inductor.config settings for every run, key=value comma-separated "
        "(e.g. max_autotune_gemm=true,coordinate_descent_tuning=true)",
    )
    args = parser.parse_args()
    compiler = inductor_settings(args.inductor)
    layers.STACK_PROJECTIONS = args.stack_projections
    adamw.ONE_LAUNCH = args.one_launch_adamw
    model = {"preset": args.model} | ({"num_layers": args.num_layers} if args.num_layers else {})
    chosen = [mode_named(m) for m in args.modes.split(",")]
    sizes = [int(b) for b in args.micro_batches.split(",")]
    runs = [
        (b, fp8, warmup, args.steps or steps)
        for b, fp8, warmup, steps in RUNS
        if fp8 in chosen and b in sizes
    ]
    if args.compare_update:
        runs = [(8, TORCH_ADAMW, 5, 45), (4, TORCH_ADAMW, 5, 20), *runs]
    start = time.perf_counter()
    data = args.data if (Path(args.data) / "meta.json").is_file() else None
    tokens = "real" if data else "synthetic"
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("nccl", init_method=url, rank=0, world_size=1, device_id=device)
    mesh = build_mesh(1, 1, 1)
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    source = f"{tokens} ({data})" if data else tokens
    sm = f"sm {capability[0]}{capability[1]}"
    stacking = f", {model}" + (", projections stacked" if args.stack_projections else "")
    stacking += ", AdamW in one launch" if args.one_launch_adamw else ""
    stacking += f", inductor {compiler}" if compiler else ""
    stacking += f", attention {args.attention_backend}" if args.attention_backend != "auto" else ""
    print(f"{name} ({sm}), torch {torch.__version__}, tokens: {source}{stacking}", flush=True)
    out = Path(os.environ["OUT"]) / "fp8.jsonl" if os.environ.get("OUT") else None
    records: dict[tuple[int, Any], dict[str, Any]] = {}
    longest = 0.0
    import torch._inductor.config as inductor

    inductor.patch(compiler).__enter__()  # every run of this process
    for micro_batch, fp8, warmup, steps in runs:
        if fp8 and fp8 != TORCH_ADAMW and capability < (8, 9):
            continue
        elapsed = time.perf_counter() - start
        if elapsed + 0.8 * longest > args.budget:
            print(f"skipped mb {micro_batch} fp8={fp8}: {elapsed:.0f} s spent, runs take {longest:.0f} s")
            continue
        torch._dynamo.reset()  # each run compiles its own graphs; no recompile limit reached across runs
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        config = config_for(micro_batch, fp8, warmup + steps, data, model, args.attention_backend)
        try:
            record = run_bench(config, mesh, device, steps=steps, warmup=warmup, tokens=tokens)
        except Exception as e:  # report and go on: one failing recipe must not hide the others' figures
            print(f"mb {micro_batch} fp8={fp8} FAILED: {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        assert record is not None
        record["fp8"] = fp8
        records[(micro_batch, fp8)] = record
        took = time.perf_counter() - began
        longest = max(longest, took)
        losses = record["losses"]
        print(f"mb {micro_batch} fp8={str(fp8):<10} {record['tokens_per_s_per_gpu']:>9,.0f} tok/s  "
              f"{record['step_time_median_s'] * 1e3:6.1f} ms/step  peak {record['peak_memory_gib']:.1f} GiB "
              f"(reserved {record['reserved_memory_gib']:.1f})  "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}  ({took:.0f} s)", flush=True)  # fmt: skip
        if out is not None:
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
    report(records, time.perf_counter() - start)
    dist.destroy_process_group()


def report(records: dict[tuple[int, Any], dict[str, Any]], seconds: float) -> None:
    print("\n| micro-batch | mode | tokens/s | vs bf16 | TFLOP/s | MFU (bf16 peak) | ms/step | peak GiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for (micro_batch, fp8), r in records.items():
        base = records.get((micro_batch, False))
        speedup = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.3f}x" if base else "n/a"
        util = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"| {micro_batch} | {fp8 or 'bf16'} | {r['tokens_per_s_per_gpu']:,.0f} | {speedup} | "
              f"{r['tflops_per_gpu']:.0f} | {util} | {r['step_time_median_s'] * 1e3:.1f} | "
              f"{r['peak_memory_gib']:.1f} |")  # fmt: skip
    base = records.get((8, False))
    if base is not None:
        print("\nloss check, micro-batch 8, same data and seed (step: loss):")
        marks = [0, 9, 19, 29, 39, 49]
        for fp8 in [*MODES, TORCH_ADAMW]:
            r = records.get((8, fp8))
            if r is None:
                continue
            losses = r["losses"]
            line = "  ".join(f"{i + 1}: {losses[i]:.3f}" for i in marks if i < len(losses))
            tail = statistics.mean(losses[-10:])
            gap = (tail / statistics.mean(base["losses"][-10:]) - 1) if fp8 else 0.0
            worst = max(abs(a / b - 1) for a, b in zip(losses, base["losses"], strict=False))
            print(f"  {fp8 or 'bf16':<10} {line}  | last-10 mean {tail:.4f} ({gap:+.2%} vs bf16; "
                  f"largest step gap {worst:.2%})")  # fmt: skip
    print(f"\ntotal {seconds:.0f} s")


if __name__ == "__main__":
    main()
