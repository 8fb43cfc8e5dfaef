"""AdamW's update of fp32 masters, with the copy into the bf16 weights in the same pass.

torch's fused AdamW updates the masters and moments in one multi-tensor kernel, and a second pass then
copies every master into its bf16 weight. Here one kernel per parameter reads the gradient, the master
and both moments once and writes the master, the moments and the bf16 weight: 30 bytes per element
instead of 28 + 6 in two kernels (docs/benchmarks.md has the measurement). On CUDA it is a Triton kernel
(threefold/_adamw_kernel.py); `adamw_update` writes the same arithmetic with torch operations, for the CPU
and for tensors that are not contiguous.

The arithmetic is AdamW's as torch writes it (decoupled decay, bias corrections from the step count,
`eps` added after the square root), in fp32. Clipping divides each gradient by `scale` as it is read;
`skip` (a device bool) leaves everything, the step counts included, as it was, so the caller never reads a
value back to the host. The learning rate is a device tensor too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BLOCK = 2048
"""Elements per Triton program: 8 per thread of 8 warps, in 16-byte loads."""


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
    triton: bool = False,
) -> None:
    """One AdamW step, in place, of each fp32 master with its first and second moments (`avgs`,
    `squares`), 0-dim fp32 step count and gradient; then the master into its weight (None: the master is
    the weight). `decays` are per tensor; `lr`, `scale` (the gradients are divided by it) and `skip` are
    0-dim device tensors. `triton`: one Triton kernel per tensor (CUDA, contiguous tensors; it compiles
    once, in about a second, where torch.compile of a 1B model's list took minutes); else torch operations."""
    beta1, beta2 = betas
    rows = zip(masters, avgs, squares, steps, grads, weights, decays, strict=True)
    if triton:
        from threefold._adamw_kernel import adamw_kernel  # imports triton: only where it runs

        keep = skip.logical_not().float()
        for master, avg, square, step, grad, weight, decay in rows:
            n = master.numel()
            adamw_kernel[((n + BLOCK - 1) // BLOCK,)](
                master, avg, square, grad, master if weight is None else weight, n, step, lr, scale, keep,
                decay, beta1, beta2, math.log2(beta1), math.log2(beta2), eps,
                HAS_WEIGHT=weight is not None, BLOCK=BLOCK, num_warps=8,
            )  # fmt: skip
        torch._foreach_add_(list(steps), keep)
        return
    keep_float = skip.logical_not().float()
    for master, avg, square, step, grad, weight, decay in rows:
        count = step + keep_float
        g = grad.float() / scale
        new_avg = avg.lerp(g, 1 - beta1)
        new_square = square * beta2 + (1 - beta2) * g * g
        step_size = lr / (1 - beta1**count)
        root_correction = (1 - beta2**count).sqrt()
        denom = new_square.sqrt() / root_correction + eps
        new_master = master * (1 - lr * decay) - step_size * new_avg / denom
        master.copy_(torch.where(skip, master, new_master))
        avg.copy_(torch.where(skip, avg, new_avg))
        square.copy_(torch.where(skip, square, new_square))
        step.copy_(count)
        if weight is not None:
            weight.copy_(master)
