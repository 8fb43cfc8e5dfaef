"""The one-pass AdamW kernel (threefold/_adamw_kernel.py) at other block sizes and warp counts, over
llama-1b's parameters on one GPU: bf16 gradients (direct gradients), fp32 masters and moments, bf16
weights. Each setting updates the same tensors (the values drift; only the time matters here).

Usage (from the repo root, on a GPU): PYTHONPATH=. python bench/adamw_blocks.py
Prints milliseconds per optimizer step (CUDA events, median of 10 after 3 warm-up steps) and the
bandwidth at 28 bytes per parameter (fp32 master, moments read and written; bf16 gradient read; bf16 weight
written), and checks that every setting writes the same masters bit for bit from the same start.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from cuda_timing import median_ms

from threefold._adamw_kernel import adamw_kernel

SHAPES = [(128256, 2048), (128256, 2048), (2048,)] + [
    s
    for _ in range(16)
    for s in [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192),
              (2048,), (2048,)]
]  # fmt: skip


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    masters = [torch.randn(s, device=dev) * 0.02 for s in SHAPES]
    start = [m.clone() for m in masters]
    avgs = [torch.zeros_like(m) for m in masters]
    squares = [torch.zeros_like(m) for m in masters]
    grads = [torch.randn(s, device=dev, dtype=torch.bfloat16) * 1e-3 for s in SHAPES]
    weights = [m.to(torch.bfloat16) for m in masters]
    step = torch.zeros((), device=dev)
    lr, scale, keep = (torch.tensor(v, device=dev) for v in (3e-4, 1.0, 1.0))
    params = sum(m.numel() for m in masters)

    def update(block: int, warps: int) -> None:
        for master, avg, square, grad, weight in zip(masters, avgs, squares, grads, weights, strict=True):
            n = master.numel()
            adamw_kernel[((n + block - 1) // block,)](
                master, avg, square, grad, weight, n, step, lr, scale, keep, 0.1, 0.9, 0.95,
                math.log2(0.9), math.log2(0.95), 1e-8, HAS_WEIGHT=True, BLOCK=block, num_warps=warps,
            )  # fmt: skip

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {params / 1e9:.3f}B parameters\n")
    print("| BLOCK | warps | ms/step | TB/s | same masters as 2048/8 |\n|---:|---:|---:|---:|---|")
    reference = None
    for block, warps in [(2048, 8), (1024, 4), (2048, 4), (4096, 8), (4096, 16), (8192, 16), (8192, 32)]:
        for m, s in zip(masters, start, strict=True):
            m.copy_(s)
        for t in avgs + squares:
            t.zero_()
        update(block, warps)  # one step from the same start: compare
        result = [m.clone() for m in masters[:4]]
        if reference is None:
            reference = result
        same = all(torch.equal(a, b) for a, b in zip(result, reference, strict=True))
        ms = median_ms(partial(update, block, warps), iters=10, warmup=3)
        print(f"| {block} | {warps} | {ms:.2f} | {28 * params / ms / 1e9:.2f} | {same} |")


if __name__ == "__main__":
    main()
