"""The ring's compute/transfer overlap, measured on one GPU with the cp ranks' transfers as a CUDA stream.

One GPU cannot hold two NCCL ranks, so this runs one cp rank's real RingAttention (forward and backward,
threefold/parallel/context.py) with the ring's point-to-point replaced by copies on a side stream: `start`
launches the next block's "transfer" there and returns at once, `wait` makes the compute stream wait for
it, exactly where the NCCL version waits for its isend/irecv. The copy is repeated `--copies` times so that
one transfer takes about as long as one block's attention; then overlap shows as a step that costs
max(compute, transfer) rather than their sum. Four timings per rank of the ring:

  compute only   the ring with transfers that do nothing (the blocks' attention alone)
  transfer only  the same number of transfers with no attention
  ring           both, transfers on the side stream (as the code runs them)
  serialized     both, transfers on the compute stream (what no overlap would cost)

A device-to-device copy runs on the SMs, which the attention blocks keep busy; with --to-host each transfer
is a copy into pinned host memory instead, done by the copy engines, as NVLink transfers are by NCCL's few
SMs and the link itself.

Usage (one H200, ~1 minute): PYTHONPATH=. python3 bench/ring_overlap.py [--seq 32768] [--cp 4] [--copies N]
Shapes: llama-1b attention (32 query heads, 8 kv heads, head dim 64), bf16, micro-batch 1.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

import threefold.parallel.context as context


class StreamRing:
    """Stands in for context._Ring: each transfer is `copies` device copies of the block on `stream`."""

    stream: torch.cuda.Stream | None = None
    copies = 1
    active = True
    sent: list[torch.Tensor] = []  # what the last ring step sent, for the transfer-only timing
    to_host = False  # copy to pinned host memory (the copy engines) instead of on the device (the SMs)
    pinned: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def copy(tensor: torch.Tensor) -> torch.Tensor:
        if not StreamRing.to_host:
            return torch.empty_like(tensor).copy_(tensor)
        key = (tuple(tensor.shape), tensor.dtype)
        if key not in StreamRing.pinned:
            StreamRing.pinned[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return StreamRing.pinned[key].copy_(tensor, non_blocking=True)

    def __init__(self, group: Any) -> None:
        pass

    def start(self, send: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        recv = torch.empty_like(send)
        StreamRing.sent.append(send.detach())
        if not StreamRing.active:
            return send, []
        stream = StreamRing.stream or torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(StreamRing.copies):
                if StreamRing.to_host:
                    StreamRing.copy(send)
                else:
                    recv.copy_(send)
            done = torch.cuda.Event()
            done.record()
        send.record_stream(stream)
        recv.record_stream(stream)
        return recv, [done]

    def wait(self, works: list[Any]) -> None:
        for event in works:
            torch.cuda.current_stream().wait_event(event)


def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, scale: float) -> None:
    out = context.RingAttention.apply(q, k, v, None, scale, None)
    out.backward(grad)


def timed(fn: Any, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--cp", type=int, default=4)
    parser.add_argument("--rank", type=int, default=1, help="which cp rank's share of the ring to run")
    parser.add_argument("--copies", type=int, default=0, help="copies per transfer (0: match the compute)")
    parser.add_argument("--to-host", action="store_true", help="transfers through the copy engines")
    args = parser.parse_args()
    cp, rank = args.cp, args.rank
    StreamRing.to_host = args.to_host
    context._Ring = StreamRing  # type: ignore[assignment,misc]
    context.dist.get_world_size = lambda group=None: cp
    context.dist.get_rank = lambda group=None: rank
    local = args.seq // cp
    gen = torch.Generator(device="cuda").manual_seed(0)

    def tensor(heads: int) -> torch.Tensor:
        return torch.randn(1, heads, local, 64, device="cuda", dtype=torch.bfloat16, generator=gen)

    q, k, v, grad = (
        tensor(32).requires_grad_(),
        tensor(8).requires_grad_(),
        tensor(8).requires_grad_(),
        tensor(32),
    )
    scale = 1.0 / math.sqrt(64)
    StreamRing.active = False
    compute = timed(lambda: step(q, k, v, grad, scale))
    StreamRing.sent = []
    step(q, k, v, grad, scale)
    sent = list(StreamRing.sent)  # forward: the kv blocks; backward: kv and the fp32 dK/dV accumulators
    StreamRing.active = True

    def transfers_only(copies: int) -> None:
        for tensor_sent in sent:
            for _ in range(copies):
                StreamRing.copy(tensor_sent)

    copies = args.copies or max(1, round(compute / timed(lambda: transfers_only(1))))
    StreamRing.copies = copies
    transfer = timed(lambda: transfers_only(copies))
    StreamRing.stream = torch.cuda.Stream()
    ring = timed(lambda: step(q, k, v, grad, scale))
    StreamRing.stream = None
    serialized = timed(lambda: step(q, k, v, grad, scale))
    mib = sum(t.numel() * t.element_size() for t in sent) / 2**20
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; seq {args.seq}, cp {cp}, rank {rank}: "
          f"{local} local tokens; {len(sent)} transfers, {mib:.0f} MiB, each copied {copies}x")  # fmt: skip
    print("| timing (ms per forward + backward) | ms |")
    print("|---|---:|")
    for name, ms in (("compute only", compute), ("transfer only", transfer), ("ring (side stream)", ring),
                     ("serialized", serialized)):  # fmt: skip
        print(f"| {name} | {ms:.2f} |")
    hidden = (compute + transfer - ring) / min(compute, transfer)
    print(f"overlap: the ring costs {ring / max(compute, transfer):.2f}x max(compute, transfer), "
          f"{ring / (compute + transfer):.2f}x their sum; {hidden:.0%} of the shorter hidden")  # fmt: skip


if __name__ == "__main__":
    main()
