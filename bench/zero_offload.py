"""Optimizer offload on one GPU: llama-8b, seq 4096, bf16 with fp32 masters, AdamW.

Three runs of the same model and batch (a fresh process group of one, synthetic tokens):
  bound     the optimizer update skipped (gradients and their norm still computed): the tokens/s the GPU
            reaches without the optimizer's cost
  offload   optimizer.offload, every fp32 master and moment in host memory, AdamW on the CPU
  split     optimizer.offload_fraction = --fraction: the rest of the state on the GPU
  auto      optimizer.offload_fraction = 'auto': the share chosen at start-up from the GPU's memory
and for each: tokens/s, the ratio to the bound, peak GPU memory (torch) next to the planner's estimate,
and peak host memory (VmHWM) next to the planner's host estimate plus what the process held before. Each
run is a child process of its own (clean GPU and host peaks). The bound's GPU estimate counts Adam moments
it never allocates (the update never runs). Planner's prediction at the defaults (GBS 32, selective
recompute): bound 10,023 tokens/s; offload 7,830 (78%; 72.7 GiB GPU, 89.7 GiB host); split 0.5: 8,792
(117.6 GiB GPU, 44.9 GiB host).

Usage (one H200, ~3-4 min):  python3 bench/zero_offload.py [--gbs 32] [--fraction 0.5] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from threefold.bench import synthetic_steps
from threefold.config import build_config
from threefold.parallel.mesh import build_mesh
from threefold.plan.memory_model import estimate_host_memory, estimate_memory
from threefold.train import build, train_step

GIB = 2**30


def host_peak() -> float:
    """This process's peak resident memory (VmHWM), GiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def host_now() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def run(name: str, config, mesh, steps: int, skip_update: bool) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before_host = host_now()
    began = time.perf_counter()
    trainer = build(config, mesh, torch.device("cuda"))
    config = trainer.config  # with offload_fraction 'auto' resolved to the share build chose
    if skip_update:
        opt = trainer.optimizer
        opt.step = lambda step, found_inf=None: (opt.grad_norm(), 0.0)  # type: ignore[method-assign]
    batches = synthetic_steps(config, mesh, torch.device("cuda"), 2)
    built = time.perf_counter() - began
    times, losses = [], []
    for i in range(steps + 1):  # the first step warms up (allocator, kernels, host moments)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(train_step(trainer, batches[i % 2], i).loss)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = sum(times[1:]) / steps
    t = config.training
    record = {
        "name": name,
        "offload_fraction": config.optimizer.offload_fraction if config.optimizer.offload else 0.0,
        "tokens_per_s": t.global_batch_size * config.data.seq_len / step_s,
        "step_s": step_s,
        "first_step_s": times[0],
        "build_s": built,
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / GIB,
        "gpu_estimate_gib": estimate_memory(config)["total"] / GIB,
        "host_peak_gib": host_peak(),
        "host_before_gib": before_host,
        "host_estimate_gib": estimate_host_memory(config) / GIB,
        "losses": [round(float(v), 4) for v in losses],
    }
    return record


def child(a: argparse.Namespace) -> None:
    """One run in this process (its own GPU and host memory, its own peak)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    mesh = build_mesh(1, 1, 1)
    training = {"dtype": "bfloat16", "device": "cuda", "micro_batch_size": a.mbs, "global_batch_size": a.gbs,
                "recompute": a.recompute}  # fmt: skip
    base = build_config(
        {"model": {"preset": "llama-8b"}, "data": {"seq_len": 4096}, "training": training}, check_paths=False
    )
    offload = {
        "bound": {},
        "offload": {"offload": True},
        "split": {"offload": True, "offload_fraction": a.fraction},
        "auto": {"offload": True, "offload_fraction": "auto"},
    }
    config = replace(base, optimizer=replace(base.optimizer, **offload[a.child]))
    print("RECORD " + json.dumps(run(a.child, config, mesh, a.steps, a.child == "bound")), flush=True)
    dist.destroy_process_group()


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--gbs", type=int, default=32, help="global batch (sequences of 4096 tokens)")
    args.add_argument("--mbs", type=int, default=1)
    args.add_argument("--recompute", default="selective")
    args.add_argument("--fraction", type=float, default=0.5, help="offload_fraction of the split run")
    args.add_argument("--steps", type=int, default=2)
    args.add_argument("--only", default="bound,offload,split")
    args.add_argument("--child", help=argparse.SUPPRESS)
    a = args.parse_args()
    if a.child:
        child(a)
        return
    records = []
    for name in a.only.split(","):
        flags = [f"--gbs={a.gbs}", f"--mbs={a.mbs}", f"--recompute={a.recompute}", f"--fraction={a.fraction}"]
        cmd = [sys.executable, __file__, f"--child={name}", f"--steps={a.steps}", *flags]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RECORD ")]
        if out.returncode or not lines:
            print(f"{name} FAILED (exit {out.returncode}):\n{out.stderr[-3000:]}", flush=True)
            continue
        records.append(json.loads(lines[0][len("RECORD ") :]))
        print(records[-1], flush=True)
    bound = next((r["tokens_per_s"] for r in records if r["name"] == "bound"), None)
    print(f"\nllama-8b seq 4096, GBS {a.gbs} x 4096, micro-batch {a.mbs}, recompute {a.recompute}, 1 GPU")
    print(
        "| run | on host | tokens/s | vs bound | step s | GPU peak GiB (plan) "
        "| host peak GiB (plan + before) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in records:
        ratio = f"{r['tokens_per_s'] / bound:.1%}" if bound else "-"
        print(
            f"| {r['name']} | {r['offload_fraction']} | {r['tokens_per_s']:,.0f} | {ratio} | "
            f"{r['step_s']:.2f} | "
            f"{r['gpu_peak_gib']:.1f} ({r['gpu_estimate_gib']:.1f}) | {r['host_peak_gib']:.1f} "
            f"({r['host_estimate_gib']:.1f} + {r['host_before_gib']:.1f}) |"
        )


if __name__ == "__main__":
    main()
