"""The rank grid: tp varies fastest, then cp, then dp, then pp; each group holds exactly the right ranks."""

import pytest
import torch.distributed as dist
from distributed import run_ranks

from threefold.parallel.mesh import build_mesh


def _coordinates(rank: int, world: int, tp: int, cp: int, dp: int, pp: int) -> dict:
    mesh = build_mesh(tp, dp, pp, cp)

    def members(group) -> list[int]:
        return sorted(dist.get_process_group_ranks(group))

    return {
        "coords": (mesh.pp_rank, mesh.dp_rank, mesh.cp_rank, mesh.tp_rank),
        "tp": members(mesh.tp_group),
        "cp": members(mesh.cp_group),
        "dp": members(mesh.dp_group),
        "dp_cp": members(mesh.dp_cp_group),
        "pp": members(mesh.pp_group),
        "mp": members(mesh.model_parallel_group),
        "neighbour": mesh.rank_at(
            pp_rank=(mesh.pp_rank + 1) % pp, dp_rank=mesh.dp_rank, tp_rank=mesh.tp_rank
        ),
    }


LAYOUTS = [(2, 1, 2, 1), (2, 1, 1, 2), (1, 1, 2, 2), (2, 1, 2, 2), (1, 2, 2, 1), (2, 2, 1, 1), (1, 2, 1, 2)]


@pytest.mark.parametrize("tp,cp,dp,pp", LAYOUTS)
def test_grid_order_and_groups(tp, cp, dp, pp):
    world = tp * cp * dp * pp
    results = run_ranks(world, _coordinates, tp, cp, dp, pp)

    def rank_of(p: int, d: int, c: int, t: int) -> int:
        return ((p * dp + d) * cp + c) * tp + t  # tp fastest, then cp, then dp, then pp

    for rank, r in enumerate(results):
        pp_rank, dp_rank, cp_rank, tp_rank = r["coords"]
        assert rank == rank_of(pp_rank, dp_rank, cp_rank, tp_rank)
        base = rank - tp_rank
        assert r["tp"] == list(range(base, base + tp))
        assert r["cp"] == [rank_of(pp_rank, dp_rank, c, tp_rank) for c in range(cp)]
        assert r["dp"] == [rank_of(pp_rank, d, cp_rank, tp_rank) for d in range(dp)]
        assert r["dp_cp"] == sorted(rank_of(pp_rank, d, c, tp_rank) for d in range(dp) for c in range(cp))
        assert r["pp"] == [rank_of(p, dp_rank, cp_rank, tp_rank) for p in range(pp)]
        assert r["mp"] == sorted(rank_of(p, dp_rank, cp_rank, t) for p in range(pp) for t in range(tp))
        assert results[r["neighbour"]]["coords"] == ((pp_rank + 1) % pp, dp_rank, cp_rank, tp_rank)


def _wrong_world(rank: int, world: int) -> None:
    build_mesh(2, 2, 2)


def test_world_size_mismatch_names_sizes():
    with pytest.raises(
        AssertionError,
        match=r"world size \(2\) must equal tp_size \(2\) \* cp_size \(1\) \* dp_size \(2\) \* pp_size",
    ):
        run_ranks(2, _wrong_world)
