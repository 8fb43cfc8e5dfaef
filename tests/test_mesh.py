"""The rank grid: tp varies fastest, then dp, then pp; each group holds exactly the right ranks."""

import pytest
import torch.distributed as dist
from distributed import run_ranks

from threefold.parallel.mesh import build_mesh


def _coordinates(rank: int, world: int, tp: int, dp: int, pp: int) -> dict:
    mesh = build_mesh(tp, dp, pp)

    def members(group) -> list[int]:
        return sorted(dist.get_process_group_ranks(group))

    return {
        "coords": (mesh.pp_rank, mesh.dp_rank, mesh.tp_rank),
        "tp": members(mesh.tp_group),
        "dp": members(mesh.dp_group),
        "pp": members(mesh.pp_group),
        "mp": members(mesh.model_parallel_group),
        "neighbour": mesh.rank_at(
            pp_rank=(mesh.pp_rank + 1) % pp, dp_rank=mesh.dp_rank, tp_rank=mesh.tp_rank
        ),
    }


@pytest.mark.parametrize("tp,dp,pp", [(2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2)])
def test_grid_order_and_groups(tp, dp, pp):
    world = tp * dp * pp
    results = run_ranks(world, _coordinates, tp, dp, pp)
    for rank, r in enumerate(results):
        pp_rank, dp_rank, tp_rank = r["coords"]
        assert rank == (pp_rank * dp + dp_rank) * tp + tp_rank  # tp fastest, then dp, then pp
        base = rank - tp_rank
        assert r["tp"] == list(range(base, base + tp))
        assert r["dp"] == [(pp_rank * dp + d) * tp + tp_rank for d in range(dp)]
        assert r["pp"] == [(p * dp + dp_rank) * tp + tp_rank for p in range(pp)]
        assert r["mp"] == sorted((p * dp + dp_rank) * tp + t for p in range(pp) for t in range(tp))
        assert results[r["neighbour"]]["coords"] == ((pp_rank + 1) % pp, dp_rank, tp_rank)


def _wrong_world(rank: int, world: int) -> None:
    build_mesh(2, 2, 2)


def test_world_size_mismatch_names_sizes():
    with pytest.raises(
        AssertionError, match=r"world size \(2\) must equal tp_size \(2\) \* dp_size \(2\) \* pp_size"
    ):
        run_ranks(2, _wrong_world)
