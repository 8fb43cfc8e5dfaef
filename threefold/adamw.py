"""AdamW's update of fp32 masters, with the copy into the bf16 weights in the same pass.

torch's fused AdamW updates the masters and moments in one multi-tensor kernel, and a second pass then
copies every master into its bf16 weight. Written element-wise, per tensor, and compiled, the update
becomes one kernel per parameter that reads the gradient, the master and both moments once and writes
the master, the moments and the bf16 weight: 30 bytes per element instead of 28 + 6 in two kernels, and
inductor's element-wise kernels run closer to the memory's speed than the multi-tensor one
(docs/benchmarks.md has the measurement).

The arithmetic is AdamW's as torch writes it (decoupled decay, bias corrections from the step count,
`eps` added after the square root), in fp32. Clipping divides each gradient by `scale` as it is read;
`skip` (a device bool) leaves everything, the step counts included, as it was, so the caller never reads a
value back to the host. The learning rate is a device tensor too, so a new value compiles nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
    0-dim device tensors."""
    beta1, beta2 = betas
    keep = skip.logical_not()
    for master, avg, square, step, grad, weight, decay in zip(
        masters, avgs, squares, steps, grads, weights, decays, strict=True
    ):
        count = step + keep.float()
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
