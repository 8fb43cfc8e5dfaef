"""The float8 layers' weights cast once per optimizer step, not once per micro-batch.

Each float8 linear casts its weight W twice a micro-batch: W^T for the forward GEMM and W, scaled along its
other dimension, for the input gradient's (threefold.parallel.fp8). Under gradient accumulation or a
pipeline schedule a rank runs several micro-batches between two optimizer steps, and W does not change
between them, so every cast after the step's first repeats it bit for bit. A cast moves about ten bytes a
weight (the amax read, the cast's read and write, for each of the two), against 6 x tokens FLOPs a weight
for the three GEMMs it feeds, so on Hopper it costs about 500 / tokens-per-micro-batch of the float8 GEMM
time: little at 16k tokens a micro-batch, a tenth and more at one sequence of 2k-4k tokens, where the
pipelined runs of large models sit.

`Float8WeightCache` keeps both casts of each layer weight (fp8.WeightOperands) in buffers of a
`CachedWeight` under the linear that owns the weight:
- the trainer opens the cache around the step's forward and backward passes (`Float8WeightCache.step`);
- the model calls `refresh` with each layer just before that layer's forward, in eager code, after ZeRO's
  all-gather of its weights has landed: the layer's weights are cast there once a step, at its first
  micro-batch, in one call for the layer (compiled where the layers are: a dozen eager kernels a weight,
  launched from Python, made the step slower on an H100 than the casts it saved);
- every forward and backward of the step reads the casts; outside a step (evaluation, sampling, tests that
  call the model) nothing is cached and the linears cast as they always did.
The float8 output layer's weight, cast in the loss's eager code, is kept the same way (`kept`). The same
idea as TransformerEngine's `is_first_microbatch`. It costs one byte a weight for each cast (two in all,
about a bf16 copy of the layers) and is built only where a step runs more than one micro-batch on a rank
and ZeRO-3 does not free the weights between micro-batches (threefold.train.build). Measured on one H100
(llama-1b rowwise, compiled, eight micro-batches a step; docs/benchmarks.md, "Float8 weights cast once a
step"): 1.06x at micro-batch 2, 1.20x at micro-batch 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import torch
from torch import nn

from threefold.config import Fp8Recipe
from threefold.parallel import fp8 as float8

T = TypeVar("T")


class Float8WeightCache:
    """The step the layers' cached casts belong to, shared by every float8 linear of a rank's model."""

    def __init__(self, recipe: Fp8Recipe, *, compiled: bool = False) -> None:
        """`compiled`: cast with torch.compile's kernels, as compiled layers cast (training.compile): a few
        fused kernels a layer where eager code launches a dozen a weight, and the same bits as the casts
        inside the compiled layers (the compiler's power-of-two scales can differ from eager code's)."""
        self.recipe = recipe
        self._cast = torch.compile(cast_into, dynamic=False) if compiled else cast_into
        self.active = False
        """Inside `step`: the linears read their cached casts (compiled code specializes on it)."""
        self.generation = 0
        """Counts the steps opened; a CachedWeight cast in an older one is stale."""
        self.casts = 0
        """Weights cast so far (each cast is both of a weight's operands)."""
        self._kept: dict[int, tuple[int, Any]] = {}
        self._refreshed: dict[int, int] = {}  # id of a module `refresh` was called with -> its last step

    @contextmanager
    def step(self) -> Iterator[None]:
        """One optimizer step's forward and backward passes: each layer's weights are cast at its first
        `refresh` within it, and read from the cache until it ends."""
        assert not self.active, "cache steps do not nest"
        self.generation += 1
        self.active = True
        try:
            yield
        finally:
            self.active = False

    @torch.no_grad()
    def refresh(self, module: nn.Module) -> None:
        """Cast the weights of the float8 linears in `module` that this step has not cast yet (nothing
        outside a step)."""
        if not self.active or self._refreshed.get(id(module)) == self.generation:
            return  # every micro-batch after a step's first: no walk over the module's children
        self._refreshed[id(module)] = self.generation
        weights, buffers = [], []
        for linear in module.modules():
            cached = getattr(linear, "cached_weight", None)
            if isinstance(cached, CachedWeight) and cached.generation != self.generation:
                weight = linear.weight
                assert isinstance(weight, torch.Tensor)
                weights.append(weight)
                buffers += cached.buffers_for(weight, self.recipe)
                cached.generation = self.generation
        if weights:  # all of the module's at once: one compiled call a layer
            self._cast(weights, buffers, self.recipe)
            self.casts += len(weights)

    def kept(self, weight: torch.Tensor, make: Callable[[], T]) -> T:
        """`make()`'s casts of `weight`, made at the first call of a step and returned again for the rest of
        it: for eager code (the float8 output layer, threefold.model.loss.output_weight_casts)."""
        assert self.active, "casts are kept inside a step only"
        key = id(weight)
        made = self._kept.get(key)
        if made is None or made[0] != self.generation:
            with torch.no_grad():
                made = (self.generation, make())
            self._kept[key] = made
            self.casts += 1
        return made[1]


class CachedWeight(nn.Module):
    """One linear's weight cast for both GEMMs that read it, kept for the rest of a step. Its buffers are
    not part of the state dict (they are made again from the weight) and are empty until the first step."""

    forward_data: torch.Tensor | None
    forward_scale: torch.Tensor | None
    backward_data: torch.Tensor | None
    backward_scale: torch.Tensor | None

    def __init__(self, cache: Float8WeightCache) -> None:
        super().__init__()
        self.cache = cache
        self.generation = 0
        # W^T's forward operand, stored as its transpose W (N, K), row-major; W's backward operand as W^T
        # (K, N), row-major: each the contiguous tensor whose .t() is the column-major operand.
        for name in ("forward_data", "forward_scale", "backward_data", "backward_scale"):
            self.register_buffer(name, None, persistent=False)

    def buffers_for(self, weight: torch.Tensor, recipe: Fp8Recipe) -> list[torch.Tensor]:
        """The four buffers `cast_into` writes `weight`'s casts into, made at the first call (written in
        place after that: compiled layers read the tensors they were traced with)."""
        if self.forward_data is None:
            n, k = weight.shape
            empty = partial(torch.empty, device=weight.device)
            rowwise = recipe == "rowwise"
            self.forward_data = empty((n, k), dtype=float8.E4M3)
            self.forward_scale = empty((1, n) if rowwise else (), dtype=torch.float32)
            self.backward_data = empty((k, n), dtype=float8.E4M3)
            self.backward_scale = empty((1, k) if rowwise else (), dtype=torch.float32)
        kept = [self.forward_data, self.forward_scale, self.backward_data, self.backward_scale]
        return [t for t in kept if t is not None]

    def operands(self) -> float8.WeightOperands | None:
        """This step's casts of the weight, or None outside a step (the caller casts the weight itself)."""
        if not self.cache.active:
            return None
        assert self.forward_data is not None and self.forward_scale is not None
        assert self.backward_data is not None and self.backward_scale is not None
        return float8.WeightOperands(
            float8.Operand(self.forward_data.t(), self.forward_scale),
            float8.Operand(self.backward_data.t(), self.backward_scale),
        )


def cast_into(weights: list[torch.Tensor], buffers: list[torch.Tensor], recipe: Fp8Recipe) -> None:
    """Write each weight's two float8 operands (fp8.weight_operands) into its four buffers (`buffers`, four
    a weight: CachedWeight's, in its order)."""
    for i, weight in enumerate(weights):
        cast = float8.weight_operands(weight, recipe)
        values = (cast.forward.data.t(), cast.forward.scale, cast.backward.data.t(), cast.backward.scale)
        for buffer, value in zip(buffers[4 * i : 4 * i + 4], values, strict=True):
            buffer.copy_(value)


def cached_weight(cache: Float8WeightCache | None, recipe: Fp8Recipe | None) -> CachedWeight | None:
    """The `CachedWeight` a float8 linear keeps under `cache`; None without float8 or without a cache."""
    return CachedWeight(cache) if cache is not None and recipe is not None else None
