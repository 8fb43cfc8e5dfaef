"""Weight gradients put off until later: the W of zero-bubble pipeline schedules.

A linear layer's backward has two products: the input gradient dX = dY W, which the previous layer (and
the previous pipeline stage) waits for, and the weight gradient dW = dY^T X, which nobody waits for. While
a `WeightGradQueue` is capturing (the executor's B action), the linear layers built with it compute dX
only and queue a closure holding X and dY; the executor runs the closures later (the W action), each
adding its dW to the parameter's gradient through autograd, so the gradient hooks (the data-parallel
reduction's bookkeeping, threefold.parallel.data_parallel) see it exactly as they would in one backward.

Why per layer rather than a second autograd pass from the stage output over the parameters: that pass
would walk the whole graph again, recomputing every activation gradient on the way (W would cost B + W),
and it would keep the whole graph and all its activations alive until W. Here W is only the dW GEMMs, and
everything but each linear layer's input and output gradient is freed when B ends (the zero-bubble
authors' choice). Other parameters (norms, embeddings, the output layer, whose weight gradient the fused
loss computes in the forward) get their gradients in B as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

WeightWork = list[Callable[[], None]]
"""The weight-gradient closures one backward queued, run in order by `run`."""


class WeightGradQueue:
    """Collects the weight-gradient work of the backward passes run inside `capture`."""

    def __init__(self) -> None:
        self.capturing = False
        self._work: WeightWork = []

    @contextmanager
    def capture(self) -> Iterator[WeightWork]:
        """Within the block, linear layers built with this queue defer their weight gradients; the
        yielded list holds them when the block ends."""
        assert not self.capturing, "captures do not nest"
        self.capturing, self._work = True, []
        work = self._work
        try:
            yield work
        finally:
            self.capturing = False

    def defer(self, fn: Callable[[], None]) -> None:
        self._work.append(fn)


def run(work: WeightWork) -> None:
    """Compute and accumulate the weight gradients one captured backward put off."""
    for fn in work:
        fn()


def accumulate(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Add `grads` to the parameters' gradients as backward would: through their AccumulateGrad nodes,
    so post-accumulate-grad hooks run."""
    torch.autograd.backward(params, grads)


def weight_grads(x: torch.Tensor, grad: torch.Tensor, has_bias: bool) -> list[torch.Tensor]:
    """[dW (out, in), db (out,) if has_bias] of y = x W^T + b, from x (..., in) and dY (..., out)."""
    flat_grad = grad.reshape(-1, grad.shape[-1])
    grads = [flat_grad.t().mm(x.reshape(-1, x.shape[-1]))]
    if has_bias:
        grads.append(flat_grad.sum(0))
    return grads


class _Linear(torch.autograd.Function):
    """y = x W^T + b whose backward defers dW (and db) while its queue captures."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, queue: WeightGradQueue
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.params = [weight] if bias is None else [weight, bias]
        ctx.queue = queue
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        grad_input = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        has_bias = len(ctx.params) == 2
        if not ctx.queue.capturing:
            grads = weight_grads(x, grad, has_bias)
            return grad_input, grads[0], grads[1] if has_bias else None, None
        params = ctx.params
        ctx.queue.defer(lambda: accumulate(params, weight_grads(x, grad, has_bias)))
        return grad_input, None, None, None


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, queue: WeightGradQueue | None
) -> torch.Tensor:
    """F.linear, with its weight gradient deferred while `queue` captures (plain F.linear without one)."""
    if queue is None:
        return F.linear(x, weight, bias)
    return _deferring_linear(x, weight, bias, queue)


@torch.compiler.disable  # the queue is Python state a compiled graph could not replay
def _deferring_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, queue: WeightGradQueue
) -> torch.Tensor:
    return _Linear.apply(x, weight, bias, queue)
