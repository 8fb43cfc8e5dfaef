"""What the pipeline's point-to-point traffic costs on this machine, to bound what overlapping it can gain.

Times, between GPU 0 and GPU 1, the two transfers the executor makes at a stage boundary of a tp=2 pipeline
with scatter/gather: a batched send + receive in both directions of one TP rank's slice (b s h / t
elements, bf16), and the all-gather of the slices over the TP pair on arrival (b s h elements).

Usage: torchrun --nproc-per-node 2 bench/p2p_cost.py [b s h t]   (default: 2 4096 4096 2, llama-8b)
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from threefold.parallel.comm import all_gather_flat


def time_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main(argv: list[str]) -> None:
    b, s, h, t = (int(x) for x in argv) if argv else (2, 4096, 4096, 2)
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    peer = 1 - rank
    n = b * s * h // t
    send, recv = torch.randn(n, device="cuda").bfloat16(), torch.empty(n, device="cuda", dtype=torch.bfloat16)
    full = torch.empty(n * 2, device="cuda", dtype=torch.bfloat16)

    def exchange() -> None:
        ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def gather() -> None:
        all_gather_flat(full, send, group=dist.group.WORLD)

    exchange_ms, gather_ms = time_ms(exchange), time_ms(gather)
    if rank == 0:
        mib = n * 2 / 2**20
        print(
            f"boundary slice {mib:.0f} MiB each way: send+recv {exchange_ms:.3f} ms "
            f"({n * 2 / exchange_ms / 1e6:.0f} GB/s per direction); all-gather to {2 * mib:.0f} MiB "
            f"{gather_ms:.3f} ms"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
