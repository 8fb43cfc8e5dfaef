"""How a model's layers get their parameters under ZeRO: the `UnitHooks` a Transformer calls around each
unit (the embedding, each layer, the head; see Transformer.units).

ZeRO-1/2 (`WaitForGather`): the parameters are whole on every rank; the forward only waits for the
previous step's all-gather of the unit's buckets, which so overlaps the forward.

ZeRO-3 (`ParamGather`): each rank keeps 1/d of every unit's parameters. A unit is all-gathered just
before its forward and freed after it; its output and its input each pass through `_OnBackward`, an
identity whose backward calls a hook: on the output the hook gathers the unit again before autograd runs
the unit's backward (weights saved for backward share the freed storage, which so comes back in place), on
the input it frees the unit once the unit's input gradient is done. While one unit computes, the next one's
all-gather is in flight (the following unit in forward, the preceding one in backward). A recomputed
layer (training.recompute = full) runs its forward again inside its backward, after the gather.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed import ProcessGroup

from threefold.parallel import track
from threefold.parallel.data_parallel import GradSync, _Bucket, free_storage, gather_bucket


class _OnBackward(torch.autograd.Function):
    """Identity forward; backward calls `hook()` first. On a unit's output the hook gathers the unit again,
    on its input it frees the unit (its backward is done)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, hook: Callable[[], None]) -> torch.Tensor:
        ctx.hook = hook
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.hook()
        return grad, None


def _tracks_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


class WaitForGather:
    """ZeRO-1/2: wait for the unit's parameter all-gather (started after the last step) before its forward."""

    def __init__(self, grad_sync: GradSync, units: list[list[torch.nn.Module]]) -> None:
        self.grad_sync = grad_sync
        self.units = units

    def enter(self, unit: int, x: torch.Tensor) -> torch.Tensor:
        for module in self.units[unit]:
            self.grad_sync.wait_for(module)
        return x

    def leave(self, unit: int, x: torch.Tensor) -> torch.Tensor:
        return x


class ParamGather:
    """ZeRO-3: gather each unit's parameters around its forward and its backward, free them after."""

    def __init__(self, grad_sync: GradSync, units: list[list[torch.nn.Module]]) -> None:
        assert grad_sync.zero >= 3
        self.dp_group: ProcessGroup = grad_sync.dp_group
        self.unit_buckets: list[list[_Bucket]] = [
            list({id(b): b for m in unit for b in grad_sync.buckets_of(m)}.values()) for unit in units
        ]

    def _start(self, unit: int) -> None:
        if 0 <= unit < len(self.unit_buckets):
            for bucket in self.unit_buckets[unit]:
                if bucket.gather is None:
                    bucket.gather = gather_bucket(bucket, self.dp_group, async_op=True, float8=True)

    def _gather(self, unit: int, prefetch: int) -> None:
        self._start(unit)
        self._start(prefetch)  # in flight while this unit computes
        for bucket in self.unit_buckets[unit]:
            if bucket.gather is not None:
                with track.waiting_for(self.dp_group, "all_gather(parameters)"):
                    bucket.gather.wait()
                bucket.gather = None

    def _free(self, unit: int, keep: int) -> None:
        kept = {id(b) for b in self.unit_buckets[keep]} if 0 <= keep < len(self.unit_buckets) else set()
        for bucket in self.unit_buckets[unit]:
            if id(bucket) in kept:
                continue
            if bucket.gather is not None:  # a prefetch nobody used: let it land before the memory goes
                bucket.gather.wait()
                bucket.gather = None
            assert bucket.param_buffer is not None
            free_storage(bucket.param_buffer)

    def enter(self, unit: int, x: torch.Tensor) -> torch.Tensor:
        self._gather(unit, prefetch=unit + 1)
        if _tracks_grad(x):
            x = _OnBackward.apply(x, lambda: self._free(unit, keep=unit - 1))
        return x

    def leave(self, unit: int, x: torch.Tensor) -> torch.Tensor:
        self._free(unit, keep=unit + 1)
        if _tracks_grad(x):
            x = _OnBackward.apply(x, lambda: self._gather(unit, prefetch=unit - 1))
        return x
