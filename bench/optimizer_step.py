"""The optimizer step alone on one GPU: llama-1b's parameters (bf16 weights, fp32 gradients, masters and
moments), torch's fused AdamW plus the copy into the weights, against the one-pass update
(`optimizer.fused_update`, threefold/adamw.py). Clipping on, so the gradient norm is part of the step.

    PYTHONPATH=. python bench/optimizer_step.py [--preset llama-1b] [--steps 20]

Prints each variant's milliseconds per step (CUDA events, median of the timed steps), the bytes the
step must move at least (the norm reads 4 bytes an element; torch's AdamW reads the gradient, master and
both moments and writes the last three, 28 bytes, and the copy 6 more; the one-pass update 30), what
that is per second, and the copy bandwidth measured on the same GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import replace

import torch
import torch.distributed as dist

from threefold.config import ModelConfig, OptimizerConfig
from threefold.infer.load import build_stage
from threefold.optim import Optimizer
from threefold.parallel.data_parallel import GradSync
from threefold.parallel.mesh import build_mesh
from threefold.presets import MODEL_PRESETS


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write)."""
    a = torch.empty(2**29, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * a.numel() * 4 / (start.elapsed_time(end) / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    mesh = build_mesh(1, 1, 1)
    cfg = ModelConfig(**MODEL_PRESETS[args.preset])
    model = build_stage(cfg, mesh, device="cuda", dtype=torch.bfloat16)
    sync = GradSync(list(model.parameters()), dp_group=mesh.dp_group, bucket_mb=25.0, zero=0)
    numel = sum(p.numel() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}: {args.preset}, "
          f"{numel / 1e9:.3f}B parameters; copy bandwidth {bandwidth / 1e12:.2f} TB/s")  # fmt: skip
    for fused in (False, True):
        opt_cfg = replace(OptimizerConfig(), fused_update=fused, warmup_steps=2)
        optimizer = Optimizer(sync.owned_ranges(), opt_cfg, mesh=mesh, max_steps=1000)
        generator = torch.Generator(device=device).manual_seed(0)
        for p in model.parameters():
            p.main_grad.normal_(0.0, 1e-3, generator=generator)  # type: ignore[attr-defined]
        times = []
        for step in range(3 + args.steps):  # 3 warm-up steps: the compilation, the state's allocation
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            optimizer.step(step)
            end.record()
            torch.cuda.synchronize()
            if step >= 3:
                times.append(start.elapsed_time(end) / 1e3)
        seconds = statistics.median(times)
        moved = numel * (4 + (30 if fused else 28 + 6))
        name = "one pass (Triton kernel)" if fused else "torch fused AdamW + copy"
        rate = moved / seconds
        print(f"{name:26s} {seconds * 1e3:7.2f} ms/step; at least {moved / 1e9:5.1f} GB moved: "
              f"{rate / 1e12:.2f} TB/s ({rate / bandwidth:.0%} of the copy's)", flush=True)  # fmt: skip
        del optimizer
        torch.cuda.empty_cache()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
