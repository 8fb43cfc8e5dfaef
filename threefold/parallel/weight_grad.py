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

from threefold.config import Fp8Recipe
from threefold.parallel import fp8 as float8

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


def weight_grads(
    x: torch.Tensor,
    grad: torch.Tensor,
    has_bias: bool,
    recipe: Fp8Recipe | None = None,
    x_fp8: float8.Operand | None = None,
    grad_t: float8.Operand | None = None,
) -> list[torch.Tensor]:
    """[dW (out, in), db (out,) if has_bias] of y = x W^T + b, from x (..., in) and dY (..., out). With an
    fp8 `recipe`, dW is the float8 GEMM (threefold.parallel.fp8), reusing `x_fp8` (x cast as its right
    operand) and `grad_t` (dY^T cast as its left one, `fp8.grad_operands`) when given."""
    flat_grad = grad.reshape(-1, grad.shape[-1])
    flat_x = x.reshape(-1, x.shape[-1])
    if recipe is None:
        grads = [flat_grad.t().mm(flat_x)]
    else:
        if x_fp8 is None:
            x_fp8 = float8.operand(flat_x, float8.E4M3, recipe, "b")
        if grad_t is None:
            grad_t = float8.grad_operands(flat_grad, recipe, for_input=False, for_weight=True).for_weight
            assert grad_t is not None
        grads = [float8.grad_weight_gemm(grad_t, x_fp8, flat_grad.dtype)]
    if has_bias:
        grads.append(flat_grad.sum(0))
    return grads


class _Linear(torch.autograd.Function):
    """y = x W^T + b whose backward defers dW (and db) while its queue captures; with an fp8 `recipe`,
    x (M, K) 2-D and all three GEMMs in float8, as threefold.parallel.fp8's linear."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        queue: WeightGradQueue,
        recipe: Fp8Recipe | None,
        *cast_tensors: torch.Tensor,
    ) -> torch.Tensor:
        """`cast_tensors`: the weight's float8 operands kept for the step (fp8.flatten_weight_operands)."""
        cast = float8.unflatten_weight_operands(cast_tensors)
        ctx.num_cast_tensors = len(cast_tensors)
        ctx.save_for_backward(x, weight, *float8.saved_backward(cast))
        ctx.params = [weight] if bias is None else [weight, bias]
        ctx.queue, ctx.recipe = queue, recipe
        if recipe is None:
            return F.linear(x, weight, bias)
        x_a = float8.operand(x, float8.E4M3, recipe, "a")
        y = float8.forward_gemm(x_a, weight, recipe, x.dtype, cast.forward if cast is not None else None)
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, weight, w_data, w_scale = ctx.saved_tensors
        w_cast = float8.restored_backward(w_data, w_scale)
        recipe = ctx.recipe
        has_bias, now = len(ctx.params) == 2, not ctx.queue.capturing
        grad_input = grads = None
        if recipe is None:
            grad_input = grad.matmul(weight) if ctx.needs_input_grad[0] else None
            grads = weight_grads(x, grad, has_bias) if now else None
        else:  # dy cast once for both GEMMs when both run now
            g = float8.grad_operands(grad, recipe, for_input=ctx.needs_input_grad[0], for_weight=now)
            if g.for_input is not None:
                grad_input = float8.grad_input_gemm(g.for_input, weight, recipe, grad.dtype, w_cast)
            if g.for_weight is not None:
                grads = weight_grads(x, grad, has_bias, recipe, grad_t=g.for_weight)
        none = [None] * ctx.num_cast_tensors
        if grads is not None:
            return grad_input, grads[0], grads[1] if has_bias else None, None, None, *none
        params = ctx.params
        ctx.queue.defer(lambda: accumulate(params, weight_grads(x, grad, has_bias, recipe)))
        return grad_input, None, None, None, None, *none


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    queue: WeightGradQueue | None,
    recipe: Fp8Recipe | None = None,
    cast: float8.WeightOperands | None = None,
) -> torch.Tensor:
    """F.linear (its GEMMs in float8 under an fp8 `recipe`, the weight's operands `cast` where made
    earlier), with its weight gradient deferred while `queue` captures (computed in the one backward
    without a queue)."""
    if queue is None:
        if recipe is None:
            return F.linear(x, weight, bias)
        y = float8.fp8_linear(x, weight, recipe, cast)
        return y if bias is None else y + bias
    return _deferring_linear(x, weight, bias, queue, recipe, cast)


@torch.compiler.disable  # the queue is Python state a compiled graph could not replay
def _deferring_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    queue: WeightGradQueue,
    recipe: Fp8Recipe | None,
    cast: float8.WeightOperands | None,
) -> torch.Tensor:
    if recipe is None:
        return _Linear.apply(x, weight, bias, queue, None)
    # 2-D inside the Function, as fp8.fp8_linear: a view of its output would refuse in-place ops after.
    flat_x = x.reshape(-1, x.shape[-1])
    y = _Linear.apply(flat_x, weight, bias, queue, recipe, *float8.flatten_weight_operands(cast))
    return y.view(*x.shape[:-1], weight.shape[0])
