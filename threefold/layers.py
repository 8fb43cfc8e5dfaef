"""Megatron-style tensor-parallel layers.

Shapes: b micro-batch, s sequence, h hidden, t tp_size, V vocabulary, Vp = V padded to a multiple of t.
"(local)" marks a tensor that holds only this TP rank's shard.

Every sharded parameter carries `tp_dim` (the dimension split across the TP group) and `tp_full_size`
(its unpadded global size along that dimension), so initialization and checkpoints can rebuild the
full tensor. Replicated parameters whose gradient is a partial sum under sequence parallelism carry
`sequence_parallel = True`; their gradients are all-reduced over the TP group after backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from threefold import watchdog
from threefold.comm import reduce_from_tp, reduce_scatter_to_sequence


def mark_sharded(param: nn.Parameter, tp_dim: int, full_size: int) -> nn.Parameter:
    param.tp_dim = tp_dim  # type: ignore[attr-defined]
    param.tp_full_size = full_size  # type: ignore[attr-defined]
    return param


def mark_sequence_parallel(param: nn.Parameter, enabled: bool) -> nn.Parameter:
    param.sequence_parallel = enabled  # type: ignore[attr-defined]
    return param


def is_sharded(param: torch.Tensor) -> bool:
    return getattr(param, "tp_dim", None) is not None


def shard_of(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of a full (unpadded) tensor, zero-padded along tp_dim as the layer expects."""
    if not is_sharded(param):
        return full
    dim = param.tp_dim  # type: ignore[attr-defined]
    local = param.shape[dim]
    padded = local * tp_size
    if full.shape[dim] < padded:
        pad_shape = list(full.shape)
        pad_shape[dim] = padded - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    return full.narrow(dim, tp_rank * local, local)


def full_shape_of(param: torch.Tensor) -> tuple[int, ...]:
    shape = list(param.shape)
    if is_sharded(param):
        shape[param.tp_dim] = param.tp_full_size  # type: ignore[attr-defined]
    return tuple(shape)


def pad_to_multiple(size: int, multiple: int) -> int:
    return multiple * math.ceil(size / multiple)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: (out/t, in) per rank, no communication.

    The input must already be identical on every TP rank: the caller applies `copy_to_tp` (or
    `gather_from_sequence` under sequence parallelism) once for all projections reading that input.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_group: ProcessGroup,
        bias: bool,
        pad_output: bool = False,
    ) -> None:
        super().__init__()
        tp_size = dist.get_world_size(tp_group)
        if out_features % tp_size and not pad_output:
            raise ValueError(f"tp_size ({tp_size}) must divide the output features ({out_features})")
        # pad_output (the vocabulary projection): zero rows up to a multiple of tp_size, masked by the loss.
        local = pad_to_multiple(out_features, tp_size) // tp_size
        self.weight = mark_sharded(nn.Parameter(torch.empty(local, in_features)), 0, out_features)
        self.bias = mark_sharded(nn.Parameter(torch.empty(local)), 0, out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, s, in) -> (b, s, out/t)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_over_tp(x_local W_local^T) + b with W split by input columns: (out, in/t) per rank.

    Reduces with an all-reduce (g), or a reduce-scatter along the sequence under sequence parallelism.
    The bias is replicated and added after the reduction, so it is counted once.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_group: ProcessGroup,
        bias: bool,
        sequence_parallel: bool,
    ) -> None:
        super().__init__()
        tp_size = dist.get_world_size(tp_group)
        if in_features % tp_size:
            raise ValueError(f"tp_size ({tp_size}) must divide the input features ({in_features})")
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.weight = mark_sharded(
            nn.Parameter(torch.empty(out_features, in_features // tp_size)), 1, in_features
        )
        self.bias = None
        if bias:
            self.bias = mark_sequence_parallel(nn.Parameter(torch.empty(out_features)), sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, s, in/t) -> (b, s, out) or (b, s/t, out)
        y = F.linear(x, self.weight)
        y = (
            reduce_scatter_to_sequence(y, self.tp_group)
            if self.sequence_parallel
            else reduce_from_tp(y, self.tp_group)
        )
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split across TP ranks: (Vp/t, h) per rank.

    Each rank looks up the ids it owns and writes zeros elsewhere; the sum over the group (all-reduce,
    or reduce-scatter along the sequence under sequence parallelism) is the full embedding.
    """

    def __init__(
        self, vocab_size: int, hidden_size: int, *, tp_group: ProcessGroup, sequence_parallel: bool
    ) -> None:
        super().__init__()
        tp_size = dist.get_world_size(tp_group)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.vocab_size = vocab_size
        self.padded_vocab_size = pad_to_multiple(vocab_size, tp_size)
        local = self.padded_vocab_size // tp_size
        self.vocab_start = dist.get_rank(tp_group) * local
        self.weight = mark_sharded(nn.Parameter(torch.empty(local, hidden_size)), 0, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (b, s) -> (b, s, h) or (b, s/t, h)
        if dist.get_world_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        local_ids = ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.tp_group)
        return reduce_from_tp(out, self.tp_group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy over vocab-sharded logits without gathering them.

    Three all-reduces over the TP group: the max (for stability), the target logit (owned by one rank),
    and the sum of exponentials. Backward is softmax minus one-hot, computed on the local shard.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        group: ProcessGroup,
        vocab_start: int,
        vocab_size: int,
    ) -> torch.Tensor:
        # logits: (n, Vp/t) local, targets: (n,) global ids
        ctx.input_dtype = logits.dtype
        # Work on a private fp32 copy: the steps below are in place to keep one (n, Vp/t) buffer alive.
        logits = logits.clone() if logits.dtype == torch.float32 else logits.float()
        num_local = logits.shape[-1]
        num_valid = min(max(vocab_size - vocab_start, 0), num_local)
        if num_valid < num_local:
            logits[:, num_valid:] = float("-inf")  # padding columns are never predicted
        world = dist.get_world_size(group)

        row_max = logits.max(dim=-1).values
        if world > 1:
            with watchdog.collective(group, "all_reduce(logit max)"):
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        logits.sub_(row_max.unsqueeze(-1))

        local_targets = targets - vocab_start
        owned = (local_targets >= 0) & (local_targets < num_local)
        local_targets = local_targets.masked_fill(~owned, 0)
        rows = torch.arange(logits.shape[0], device=logits.device)
        target_logit = logits[rows, local_targets].masked_fill(~owned, 0.0)

        exp = logits.exp_()
        sum_exp = exp.sum(dim=-1)
        if world > 1:
            both = torch.stack([target_logit, sum_exp])
            with watchdog.collective(group, "all_reduce(softmax sums)"):
                dist.all_reduce(both, group=group)
            target_logit, sum_exp = both[0], both[1]
        loss = torch.log(sum_exp) - target_logit

        exp.div_(sum_exp.unsqueeze(-1))  # now the softmax, kept for backward
        ctx.save_for_backward(exp, local_targets, owned)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, local_targets, owned = ctx.saved_tensors
        grad = softmax  # reuse the buffer: nothing else needs the softmax
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_targets] -= owned.to(grad.dtype)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, *, tp_group: ProcessGroup, vocab_size: int
) -> torch.Tensor:
    """Per-token loss (fp32) for local logits (..., Vp/t) and global target ids (...)."""
    local_vocab = logits.shape[-1]
    vocab_start = dist.get_rank(tp_group) * local_vocab
    flat = _VocabParallelCrossEntropy.apply(
        logits.reshape(-1, local_vocab), targets.reshape(-1), tp_group, vocab_start, vocab_size
    )
    return flat.view(targets.shape)


@torch.no_grad()
def gather_full(param: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """The full, unpadded tensor of a (possibly sharded) parameter, on every TP rank."""
    if not is_sharded(param):
        return param.detach().clone()
    dim, size = param.tp_dim, param.tp_full_size  # type: ignore[attr-defined]
    world = dist.get_world_size(tp_group)
    parts = [torch.empty_like(param) for _ in range(world)]
    dist.all_gather(parts, param.detach().contiguous(), group=tp_group)
    return torch.cat(parts, dim=dim).narrow(dim, 0, size)
