"""Does a host-to-GPU copy of a step's token ids make the host wait for the work queued before it?

Usage (from the repo root, on a GPU): PYTHONPATH=. python bench/h2d_wait.py
For each size, queues about a second of GPU work (torch.cuda._sleep), then copies (b, 2048) int64 token ids
with `.to(device, non_blocking=True)` from pageable memory (what threefold.train._to_device does) and through
`pin_memory()`, and prints how long the host took to queue the copy. A copy that waits takes about as long
as the queued work.
"""

from __future__ import annotations

import time

import torch


def host_ms(ids: torch.Tensor, pin: bool, device: torch.device) -> float:
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    started = time.perf_counter()
    (ids.pin_memory() if pin else ids).to(device, non_blocking=True)
    took = time.perf_counter() - started
    torch.cuda.synchronize()
    return took * 1e3


def main() -> None:
    device = torch.device("cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    torch.cuda._sleep(2_000_000_000)
    torch.cuda.synchronize()
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; the queued work: "
        f"{(time.perf_counter() - started) * 1e3:.0f} ms"
    )
    print("| token ids | bytes | pageable: host ms | pinned: host ms |\n|---|---:|---:|---:|")
    for rows in (1, 4, 8, 16):
        ids = torch.randint(0, 128256, (rows, 2048))
        host_ms(ids, True, device)  # the pinned block and the copy path warm
        pageable = min(host_ms(ids, False, device) for _ in range(3))
        pinned = min(host_ms(ids, True, device) for _ in range(3))
        print(f"| ({rows}, 2048) | {ids.numel() * 8:,} | {pageable:.2f} | {pinned:.2f} |")


if __name__ == "__main__":
    main()
