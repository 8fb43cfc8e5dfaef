"""Compiled vs eager gradients of one tensor-parallel transformer layer, on GPUs with NCCL (fp32).

For each combination of sequence parallelism and parallel.overlap_tp_comm, runs the same layer eagerly
and under torch.compile on the same input and prints the largest difference of the output, the input
gradient and each weight gradient. Differences near 1e-6 are rounding; a broken gradient shows as O(1).

Usage: torchrun --nproc-per-node 2 bench/compile_tp_check.py
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from threefold.config import ModelConfig
from threefold.model.transformer import Block, TPContext, rope_cache
from threefold.presets import MODEL_PRESETS


def compare(sp: bool, overlap: bool, device: torch.device) -> dict[str, float]:
    cfg = ModelConfig(**MODEL_PRESETS["tiny"])
    tp = TPContext(dist.group.WORLD, sp, overlap_comm=overlap)
    torch.manual_seed(0)
    with torch.device(device):
        eager, compiled = Block(cfg, tp), Block(cfg, tp)
    for p in eager.parameters():
        torch.nn.init.normal_(p, std=0.1)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    s, world = 64, dist.get_world_size()
    torch.manual_seed(1)
    x = torch.randn(2, s // (world if sp else 1), cfg.hidden_size, device=device)
    rope = rope_cache(cfg, s, device)
    results = []
    for block in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = block(xi, rope)
        (y * torch.arange(y.numel(), device=device).view_as(y).float().sin()).sum().backward()
        results.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in block.named_parameters()}))
    (y0, g0, w0), (y1, g1, w1) = results
    diffs = {"output": (y0 - y1).abs().max().item(), "input grad": (g0 - g1).abs().max().item()}
    diffs.update({n: (w0[n] - w1[n]).abs().max().item() for n in w0})
    return diffs


def main() -> None:
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    for sp in (False, True):
        for overlap in (False, True):
            diffs = compare(sp, overlap, device)
            if rank == 0:
                worst = max(diffs, key=lambda k: diffs[k])
                print(
                    f"sp={sp} overlap_tp_comm={overlap}: worst {worst} {diffs[worst]:.2e}; "
                    + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
                )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
