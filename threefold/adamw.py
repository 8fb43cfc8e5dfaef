"""AdamW's update of fp32 masters, with the copy into the bf16 weights in the same pass, on CUDA.

torch's fused AdamW updates the masters and moments in one multi-tensor kernel, and a second pass then
copies every master into its bf16 weight. Here one Triton kernel per parameter (threefold/_adamw_kernel.py)
reads the gradient, the master and both moments once and writes the master, the moments and the bf16
weight: 30 bytes per element instead of 28 + 6 in two kernels (docs/benchmarks.md has the measurement).
Elsewhere the optimizer keeps torch's AdamW: written with torch operations the same update ran 5-7 times
slower than torch's foreach AdamW on the CPU. The tests run the kernel on the CPU under Triton's
interpreter (TRITON_INTERPRET=1) against torch's AdamW.

The arithmetic is AdamW's as torch writes it (decoupled decay, bias corrections from the step count,
`eps` added after the square root), in fp32. Clipping divides each gradient by `scale` as it is read;
`skip` (a device bool) leaves everything, the step counts included, as it was, so the caller never reads a
value back to the host. The learning rate is a device tensor too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BLOCK = 1024
"""Elements per Triton program: 8 per thread of NUM_WARPS warps, in 16-byte loads."""
NUM_WARPS = 4
"""Warps per program. 1024 / 4 measured 10.66 ms for a step over 1.5B parameters against 10.94 for 2048 / 8
(3.94 against 3.84 TB/s), the masters equal bit for bit; the fastest of seven shapes (one H200, torch 2.11,
2026-12-04, `python bench/adamw_blocks.py`: bench/results/issue18-2026-12-04-s9/call5-adamw_blocks.txt)."""


def adamw_update(
    masters: Sequence[torch.Tensor],
    avgs: Sequence[torch.Tensor],
    squares: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor | None],
    decays: Sequence[float],
    *,
    lr: torch.Tensor,
    scale: torch.Tensor,
    skip: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """One AdamW step, in place, of each fp32 master with its first and second moments (`avgs`,
    `squares`), 0-dim fp32 step count and gradient; then the master into its weight (None: the master is
    the weight). `decays` are per tensor; `lr`, `scale` (the gradients are divided by it) and `skip` are
    0-dim device tensors. One Triton kernel launch per tensor (contiguous tensors); the kernel compiles
    once, in about a second, where torch.compile of a 1B model's list of updates took minutes."""
    from threefold._adamw_kernel import adamw_kernel  # imports triton: only where it runs

    beta1, beta2 = betas
    keep = skip.logical_not().float()
    for master, avg, square, step, grad, weight, decay in zip(
        masters, avgs, squares, steps, grads, weights, decays, strict=True
    ):
        n = master.numel()
        adamw_kernel[((n + BLOCK - 1) // BLOCK,)](
            master, avg, square, grad, master if weight is None else weight, n, step, lr, scale, keep,
            decay, beta1, beta2, math.log2(beta1), math.log2(beta2), eps,
            HAS_WEIGHT=weight is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    # A list of tensors, not the 0-dim `keep` alone: that overload reads it as a host scalar (.item()),
    # which would make the host wait for the device every step.
    torch._foreach_add_(list(steps), [keep] * len(steps))
