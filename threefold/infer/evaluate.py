"""Loss and perplexity of a model over a prepared split, as training's validation defines them.

The split is cut into consecutive windows of seq_len + 1 tokens (data.dataset.TokenDataset): window i
has inputs x[i S : (i+1) S] and targets x[i S + 1 : (i+1) S + 1]. The loss is the mean cross-entropy
over every target token of the windows scored; perplexity is its exponential. Micro-batches go to the
data-parallel ranks in turn; pipeline stages pass hidden states forward as in generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from threefold.data.dataset import TokenDataset
from threefold.model.transformer import Transformer
from threefold.parallel.mesh import Mesh


@dataclass
class EvalResult:
    loss: float
    """Mean cross-entropy per target token, in nats."""
    perplexity: float
    num_windows: int
    num_tokens: int


def windows_to_score(dataset: TokenDataset, num_batches: int | None, micro_batch_size: int) -> int:
    """How many windows: all of the split, or the first num_batches micro-batches' worth (at most all)."""
    if num_batches is None:
        return dataset.num_samples
    return min(dataset.num_samples, num_batches * micro_batch_size)


@torch.no_grad()
def evaluate(
    model: Transformer,
    dataset: TokenDataset,
    mesh: Mesh,
    *,
    micro_batch_size: int,
    num_batches: int | None = None,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Score the first windows of `dataset` (see windows_to_score) with this rank's stage of the model;
    every rank returns the same result."""
    count = windows_to_score(dataset, num_batches, micro_batch_size)
    starts = range(0, count, micro_batch_size)
    mine = list(starts)[mesh.dp_rank :: mesh.dp_size]
    total = torch.zeros((), dtype=torch.float64, device=device)
    dtype = next(model.parameters()).dtype
    for start in mine:
        x, y = dataset.get_batch(np.arange(start, min(start + micro_batch_size, count)))
        x, y = x.to(device), y.to(device)
        if not mesh.is_first_stage:
            hidden = torch.empty(*x.shape, model.cfg.hidden_size, dtype=dtype, device=device)
            dist.recv(
                hidden, src=mesh.rank_at(pp_rank=mesh.pp_rank - 1, dp_rank=mesh.dp_rank, tp_rank=mesh.tp_rank)
            )
            inputs = hidden
        else:
            inputs = x
        if mesh.is_last_stage:
            total += model(inputs, y).double() * y.numel()  # the mean over the micro-batch's tokens
        else:
            out = model(inputs)
            dist.send(
                out.contiguous(),
                dst=mesh.rank_at(pp_rank=mesh.pp_rank + 1, dp_rank=mesh.dp_rank, tp_rank=mesh.tp_rank),
            )
    if mesh.pp_size > 1:  # the last stage's sum, on every stage
        src = mesh.rank_at(pp_rank=mesh.pp_size - 1, dp_rank=mesh.dp_rank, tp_rank=mesh.tp_rank)
        dist.broadcast(total, src=src, group=mesh.pp_group)
    dist.all_reduce(total, group=mesh.dp_group)
    num_tokens = count * dataset.seq_len
    loss = float(total) / num_tokens
    return EvalResult(
        loss=loss, perplexity=math.exp(min(loss, 700.0)), num_windows=count, num_tokens=num_tokens
    )
