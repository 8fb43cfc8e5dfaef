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
  micro-batch;
- every forward and backward of the step reads the casts; outside a step (evaluation, sampling, tests that
  call the model) nothing is cached and the linears cast as they always did.
The same idea as TransformerEngine's `is_first_microbatch`. It costs one byte a weight for each cast (two
in all, about a bf16 copy of the layers) and is built only where a step runs more than one micro-batch on
a rank and ZeRO-3 does not free the weights between micro-batches (threefold.train.build).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from threefold.config import Fp8Recipe
from threefold.parallel import fp8 as float8


class Float8WeightCache:
    """The step the layers' cached casts belong to, shared by every float8 linear of a rank's model."""

    def __init__(self, recipe: Fp8Recipe) -> None:
        self.recipe = recipe
        self.active = False
        """Inside `step`: the linears read their cached casts (compiled code specializes on it)."""
        self.generation = 0
        """Counts the steps opened; a CachedWeight cast in an older one is stale."""
        self.casts = 0
        """Weights cast so far (each cast is both of a weight's operands)."""

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
        if not self.active:
            return
        for linear in module.modules():
            cached = getattr(linear, "cached_weight", None)
            if isinstance(cached, CachedWeight) and cached.generation != self.generation:
                weight = linear.weight
                assert isinstance(weight, torch.Tensor)
                cached.store(float8.weight_operands(weight, self.recipe), self.generation)
                self.casts += 1


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

    def store(self, cast: float8.WeightOperands, generation: int) -> None:
        values = {
            "forward_data": cast.forward.data.t(),
            "forward_scale": cast.forward.scale,
            "backward_data": cast.backward.data.t(),
            "backward_scale": cast.backward.scale,
        }
        for name, value in values.items():
            kept = getattr(self, name)
            if kept is None:
                setattr(self, name, value.contiguous())
            else:  # in place: compiled code holds on to the buffers it was traced with
                kept.copy_(value)
        self.generation = generation

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


def cached_weight(cache: Float8WeightCache | None, recipe: Fp8Recipe | None) -> CachedWeight | None:
    """The `CachedWeight` a float8 linear keeps under `cache`; None without float8 or without a cache."""
    return CachedWeight(cache) if cache is not None and recipe is not None else None
