"""The largest Llama-shaped model that trains on one GPU with optimizer offload, by the planner, and its run.

The planner's part runs anywhere (no GPU, no torch kernels): Llama shapes (8 kv heads, seq 4096, micro-batch
1, global batch 32, full recomputation, bf16 with fp32 masters, AdamW, `optimizer.offload_fraction = "auto"`)
are grown layer by layer at hidden sizes 4096, 5120 and 6144, and the largest whose predicted peak fits the
GPU's memory with 5% to spare and whose host state fits 90% of the host's memory is printed, with the share
'auto' picks, the memory estimates and the predicted tokens/s. With --run (on the GPU machine) it then
trains that model for `--steps` steps through `threefold bench` (synthetic tokens) and prints the measured
tokens/s and GPU and host peaks next to the prediction.

Usage: PYTHONPATH=. python bench/largest_one_gpu.py [--gpu h200] [--gpu-gib 139.8] [--host-gib 124] [--run]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from typing import Any

from threefold.config import build_config
from threefold.metrics import count_parameters
from threefold.plan.fit import AUTO_OFFLOAD_MARGIN, resolve_offload
from threefold.plan.hardware import load_hardware
from threefold.plan.memory_model import estimate_host_memory, estimate_memory
from threefold.plan.time_model import estimate_step_time

GIB = 2**30
SHAPES = ((4096, 32, 14336), (5120, 40, 13824), (6144, 48, 16384))  # hidden, heads, MLP width
BASELINE_HOST_GIB = 0.7  # Python + torch before the model is built (bench/zero_offload.py's "before")


def model_section(hidden: int, heads: int, ffn: int, layers: int) -> dict[str, Any]:
    return {"preset": "llama-8b", "hidden_size": hidden, "num_heads": heads, "num_kv_heads": 8,
            "ffn_hidden_size": ffn, "num_layers": layers}  # fmt: skip


def raw_config(model: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model,
        "data": {"seq_len": 4096},
        "training": {"device": "cuda", "dtype": "bfloat16", "micro_batch_size": 1, "global_batch_size": 32,
                     "recompute": "full"},
        "optimizer": {"offload": True, "offload_fraction": "auto"},
    }  # fmt: skip


def largest(gpu_bytes: float, host_bytes: float) -> tuple[int, dict[str, Any]] | None:
    best: tuple[int, dict[str, Any]] | None = None
    for hidden, heads, ffn in SHAPES:
        for layers in range(16, 129, 2):
            model = model_section(hidden, heads, ffn, layers)
            config = resolve_offload(build_config(raw_config(model), check_paths=False), gpu_bytes)
            gpu = estimate_memory(config)["total"]
            host = estimate_host_memory(config) + BASELINE_HOST_GIB * GIB
            if gpu > gpu_bytes * (1 - AUTO_OFFLOAD_MARGIN) or host > host_bytes:
                continue
            params = count_parameters(config.model)["total"]
            if best is None or params > best[0]:
                best = (params, {"model": model, "config": config, "gpu": gpu, "host": host})
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", default="h200")
    parser.add_argument("--gpu-gib", type=float, default=139.8, help="the GPU's memory as torch reports it")
    parser.add_argument("--host-gib", type=float, default=124.0,
                        help="the host memory the trainer's check sees (the 128 GB H200 machine: 124.8 GiB "
                             "available); offload may take 90%% of it")  # fmt: skip
    parser.add_argument("--run", action="store_true", help="train the model found (needs the GPU)")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    found = largest(args.gpu_gib * GIB, 0.9 * args.host_gib * GIB)
    if found is None:
        print("no shape fits")
        return
    params, best = found
    config = best["config"]
    step = estimate_step_time(config, load_hardware(args.gpu)).step
    tokens = config.training.global_batch_size * config.data.seq_len / step
    share = config.optimizer.offload_fraction
    print(f"largest: {params / 1e9:.2f}B parameters, {json.dumps(best['model'])}")
    print(f"predicted: offload share {share}, GPU {best['gpu'] / GIB:.1f} GiB, host {best['host'] / GIB:.1f} "
          f"GiB (with {BASELINE_HOST_GIB} baseline), {tokens:,.0f} tokens/s, step {step:.1f} s")  # fmt: skip
    if not args.run:
        return
    overrides = [f"--model.{k}={v}" for k, v in best["model"].items()]
    overrides += ["--data.seq_len=4096", "--training.device=cuda", "--training.dtype=bfloat16",
                  "--training.micro_batch_size=1", "--training.global_batch_size=32",
                  "--training.recompute=full", "--optimizer.offload=true",
                  "--optimizer.offload_fraction=auto"]  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        cmd = [sys.executable, "-m", "threefold", "bench", *overrides, f"--steps={args.steps}", "--warmup=1",
               f"--json-out={out.name}"]  # fmt: skip
        print("$", " ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        print(done.stdout[-2000:], done.stderr[-3000:], flush=True)
        if done.returncode == 0:
            record = json.loads(open(out.name).read().splitlines()[-1])
            host_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB  # kB on Linux
            print(f"measured: {record['tokens_per_s_per_gpu']:,.0f} tokens/s, GPU peak "
                  f"{record['peak_memory_gib']:.1f} GiB, host peak (the child's VmHWM) {host_peak:.1f} GiB",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
