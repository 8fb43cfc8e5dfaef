"""The rank grid and its process groups, built once and passed to whatever needs a group.

Axis order, fastest-varying first: tp, dp, pp. Ranks that differ only in their tp coordinate are
consecutive, so a tensor-parallel group sits inside one node (its all-reduces are the heaviest traffic);
pipeline stages are the slowest-varying axis, so only point-to-point activations cross node boundaries.

    grid = torch.arange(world).view(pp_size, dp_size, tp_size)    # grid[pp_rank, dp_rank, tp_rank] = rank
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class Mesh:
    """This rank's coordinates in the (pp, dp, tp) grid and the groups it belongs to.

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
    """First and last pipeline rank of this (dp, tp) column, which both hold tied embeddings; None
    on the other ranks and when pp_size == 1."""
    grid: torch.Tensor

    @property
    def world_size(self) -> int:
        return self.tp_size * self.dp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def rank_at(self, *, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        """Global rank of a grid coordinate (e.g. a pipeline neighbour)."""
        return int(self.grid[pp_rank, dp_rank, tp_rank])

    def __repr__(self) -> str:
        return (
            f"Mesh(rank={self.rank}, tp={self.tp_rank}/{self.tp_size}, "
            f"dp={self.dp_rank}/{self.dp_size}, pp={self.pp_rank}/{self.pp_size})"
        )


def build_mesh(tp_size: int, dp_size: int, pp_size: int) -> Mesh:
    """Create every process group of the grid; call on all ranks after init_process_group."""
    world = dist.get_world_size()
    if world != tp_size * dp_size * pp_size:
        raise ValueError(
            f"world size ({world}) must equal tp_size ({tp_size}) * dp_size ({dp_size}) * pp_size ({pp_size})"
        )
    rank = dist.get_rank()
    grid = torch.arange(world).view(pp_size, dp_size, tp_size)
    pp_rank, dp_rank, tp_rank = (int(i) for i in (grid == rank).nonzero()[0])

    def groups_along(ranks_per_group: torch.Tensor) -> ProcessGroup:
        # new_group is collective: every rank creates every group, in the same order, and keeps its own.
        mine = None
        for ranks in ranks_per_group.tolist():
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
        assert mine is not None
        return mine

    tp_group = groups_along(grid.reshape(-1, tp_size))
    dp_group = groups_along(grid.permute(0, 2, 1).reshape(-1, dp_size))
    pp_group = groups_along(grid.permute(1, 2, 0).reshape(-1, pp_size))
    mp_group = groups_along(grid.permute(1, 0, 2).reshape(dp_size, pp_size * tp_size))
    embedding_group = None
    if pp_size > 1:
        ends = grid[[0, pp_size - 1]].permute(1, 2, 0).reshape(-1, 2)  # (first, last) per (dp, tp)
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
    )
