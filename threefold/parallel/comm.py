"""Differentiable collectives for tensor and sequence parallelism.

Each one is a small autograd.Function whose forward and backward are dual: what one direction
reduces, the other copies. Names follow the Megatron paper's conjugate operators f and g.
Sequence-parallel tensors are split along dim 1 (activations are (b, s, h)).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from threefold.parallel import track

SEQ_DIM = 1

# torch 2.13 renamed the flat-tensor collectives (the old names warn); older torch has only the old ones.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    if dist.get_world_size(group) > 1:
        x = x.contiguous()
        with track.collective(group, "all_reduce"):
            dist.all_reduce(x, group=group)
    return x


def _all_gather_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(b, s/t, h) local -> (b, s, h), concatenated in tp-rank order."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    local = x.transpose(0, SEQ_DIM).contiguous()  # (s/t, b, h): gather along a leading dim is one copy
    out = torch.empty((world * local.shape[0], *local.shape[1:]), dtype=x.dtype, device=x.device)
    with track.collective(group, "all_gather"):
        all_gather_flat(out, local, group=group)
    # One contiguous copy shared by every projection reading it (a transposed view would make each
    # matmul save a private contiguous copy for backward).
    return out.transpose(0, SEQ_DIM).contiguous()


def _reduce_scatter_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(b, s, h) partial sums -> (b, s/t, h) summed over the group, this rank's sequence chunk."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if x.shape[SEQ_DIM] % world:
        raise ValueError(f"sequence length ({x.shape[SEQ_DIM]}) must be divisible by tp_size ({world})")
    full = x.transpose(0, SEQ_DIM).contiguous()
    out = torch.empty((full.shape[0] // world, *full.shape[1:]), dtype=x.dtype, device=x.device)
    with track.collective(group, "reduce_scatter"):
        reduce_scatter_flat(out, full, group=group)
    return out.transpose(0, SEQ_DIM)


class CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce backward: the paper's f, entering a column-parallel region."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward: the paper's g, leaving a row-parallel region."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        # In place: the partial sums are dead after this, and a copy of (b, s, h) per layer adds up.
        assert x.is_contiguous(), "row-parallel outputs are contiguous"
        with track.collective(group, "all_reduce"):
            dist.all_reduce(x, group=group)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class GatherFromSequence(torch.autograd.Function):
    """All-gather along the sequence forward, reduce-scatter backward (sequence-parallel f)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter_seq(grad, ctx.group), None


class ReduceScatterToSequence(torch.autograd.Function):
    """Reduce-scatter along the sequence forward, all-gather backward (sequence-parallel g)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather_seq(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return CopyToTP.apply(x, group) if dist.get_world_size(group) > 1 else x


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return ReduceFromTP.apply(x, group) if dist.get_world_size(group) > 1 else x


def gather_from_sequence(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return GatherFromSequence.apply(x, group) if dist.get_world_size(group) > 1 else x


def reduce_scatter_to_sequence(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return ReduceScatterToSequence.apply(x, group) if dist.get_world_size(group) > 1 else x
