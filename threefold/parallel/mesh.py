"""The rank grid and its process groups, built once and passed to whatever needs a group.

Axis order, fastest-varying first: tp, cp, dp, pp. Ranks that differ only in their tp coordinate are
consecutive, so a tensor-parallel group sits inside one node (its all-reduces are the heaviest traffic).
Context parallelism comes next: its ring passes every layer's K/V blocks (or its all-to-alls re-shard
every layer's q, k, v), more traffic than data parallelism's once-a-step gradients, so cp neighbours sit
inside a node whenever tp_size * cp_size fits in one. Pipeline stages are the slowest-varying axis, so
only point-to-point activations cross node boundaries.

    grid = torch.arange(world).view(pp_size, dp_size, cp_size, tp_size)
    grid[pp_rank, dp_rank, cp_rank, tp_rank] = rank

The cp ranks of a replica hold the same weights, so for gradients and the optimizer they are replicas
like the dp ranks: gradients are averaged (and ZeRO shards its state) over the dp x cp group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class Mesh:
    """This rank's coordinates in the (pp, dp, cp, tp) grid and the groups it belongs to.

    Every group is a real `ProcessGroup` (also of size 1), so layers never special-case a missing group.
    """

    rank: int
    tp_size: int
    dp_size: int
    pp_size: int
    tp_rank: int
    dp_rank: int
    pp_rank: int
    tp_group: ProcessGroup
    dp_group: ProcessGroup
    pp_group: ProcessGroup
    model_parallel_group: ProcessGroup
    """tp x pp ranks that together hold one model replica (for the global gradient norm)."""
    embedding_group: ProcessGroup | None
    """First and last pipeline rank of this (dp, cp, tp) column, which both hold tied embeddings; None
    on the other ranks and when pp_size == 1."""
    grid: torch.Tensor
    """grid[pp_rank, dp_rank, cp_rank, tp_rank] = rank."""
    cp_size: int
    cp_rank: int
    cp_group: ProcessGroup
    """The context-parallel ring: ranks holding the chunks of the same sequences."""
    dp_cp_group: ProcessGroup
    """dp x cp ranks holding the same weights: gradients are averaged, and ZeRO shards, over it (the dp
    group itself when cp_size is 1)."""

    @property
    def world_size(self) -> int:
        return self.tp_size * self.cp_size * self.dp_size * self.pp_size

    @property
    def dp_cp_size(self) -> int:
        """Ranks holding the same weights: dp_size * cp_size."""
        return self.dp_size * self.cp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def rank_at(self, *, pp_rank: int, dp_rank: int, tp_rank: int, cp_rank: int | None = None) -> int:
        """Global rank of a grid coordinate (e.g. a pipeline neighbour); cp_rank None: this rank's."""
        cp = self.cp_rank if cp_rank is None else cp_rank
        return int(self.grid[pp_rank, dp_rank, cp, tp_rank])

    def __repr__(self) -> str:
        cp = f", cp={self.cp_rank}/{self.cp_size}" if self.cp_size > 1 else ""
        return (
            f"Mesh(rank={self.rank}, tp={self.tp_rank}/{self.tp_size}{cp}, "
            f"dp={self.dp_rank}/{self.dp_size}, pp={self.pp_rank}/{self.pp_size})"
        )


def build_mesh(tp_size: int, dp_size: int, pp_size: int, cp_size: int = 1) -> Mesh:
    """Create every process group of the grid; call on all ranks after init_process_group."""
    world = dist.get_world_size()
    if world != tp_size * cp_size * dp_size * pp_size:
        raise ValueError(
            f"world size ({world}) must equal tp_size ({tp_size}) * cp_size ({cp_size}) * dp_size "
            f"({dp_size}) * pp_size ({pp_size})"
        )
    rank = dist.get_rank()
    grid = torch.arange(world).view(pp_size, dp_size, cp_size, tp_size)
    pp_rank, dp_rank, cp_rank, tp_rank = (int(i) for i in (grid == rank).nonzero()[0])

    def groups_along(ranks_per_group: torch.Tensor) -> ProcessGroup:
        # new_group is collective: every rank creates every group, in the same order, and keeps its own.
        mine = None
        for ranks in ranks_per_group.tolist():
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
        assert mine is not None
        return mine

    # Each group: move its axes last, then every row of the flattened grid is one group.
    tp_group = groups_along(grid.reshape(-1, tp_size))
    cp_group = groups_along(grid.permute(0, 1, 3, 2).reshape(-1, cp_size))
    dp_group = groups_along(grid.permute(0, 2, 3, 1).reshape(-1, dp_size))
    dp_cp_group = (
        groups_along(grid.permute(0, 3, 1, 2).reshape(-1, dp_size * cp_size)) if cp_size > 1 else dp_group
    )
    pp_group = groups_along(grid.permute(1, 2, 3, 0).reshape(-1, pp_size))
    mp_group = groups_along(grid.permute(1, 2, 0, 3).reshape(-1, pp_size * tp_size))
    embedding_group = None
    if pp_size > 1:
        ends = grid[[0, pp_size - 1]].permute(1, 2, 3, 0).reshape(-1, 2)  # (first, last) per (dp, cp, tp)
        for pair in ends.tolist():
            group = dist.new_group(pair)
            if rank in pair:
                embedding_group = group
    return Mesh(
        rank=rank,
        tp_size=tp_size,
        dp_size=dp_size,
        pp_size=pp_size,
        tp_rank=tp_rank,
        dp_rank=dp_rank,
        pp_rank=pp_rank,
        tp_group=tp_group,
        dp_group=dp_group,
        pp_group=pp_group,
        model_parallel_group=mp_group,
        embedding_group=embedding_group,
        grid=grid,
        cp_size=cp_size,
        cp_rank=cp_rank,
        cp_group=cp_group,
        dp_cp_group=dp_cp_group,
    )
