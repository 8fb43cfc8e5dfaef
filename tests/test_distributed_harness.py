"""The test harness's own contract: a failed rendezvous is retried on a new port, a failing rank is not;
the comparisons the layout tests share catch a difference on any rank, in any loss, norm or weight."""

from __future__ import annotations

import os
from pathlib import Path

import distributed as harness
import pytest
import torch
import torch.distributed as dist
from distributed import assert_same_training, assert_trains_like, run_ranks


def _rank_and_world(rank: int, world_size: int, log: Path) -> tuple[int, int]:
    with open(log, "a") as f:  # the launch (its port, where _flaky_init noted it) and the rank
        f.write(f"{os.environ.get(LAUNCH_PORT, '?')}:{rank}\n")
    return rank, dist.get_world_size()


LAUNCH_PORT = "THREEFOLD_TEST_LAUNCH_PORT"
"""Where `_flaky_init` leaves the port of the rank's launch for `_rank_and_world` (each rank is a fork)."""


def _flaky_init(marker: Path):
    """init_process_group that fails on rank 1 until `marker` exists, as gloo's lost connections do."""
    real = dist.init_process_group

    def init(*args, **kwargs):
        os.environ[LAUNCH_PORT] = kwargs["init_method"].rsplit(":", 1)[1]
        if kwargs.get("rank") == 1 and not marker.exists():
            marker.touch()
            raise RuntimeError("Gloo connectFullMesh failed with ... Connection closed by peer")
        return real(*args, **kwargs)

    return init


def test_a_lost_rendezvous_is_launched_again_on_a_fresh_port(tmp_path, monkeypatch):
    used: list[int] = []
    free_port = harness._free_port

    def next_port() -> int:
        used.append(free_port())
        return used[-1]

    monkeypatch.setattr(harness, "_free_port", next_port)
    monkeypatch.setattr(dist, "init_process_group", _flaky_init(tmp_path / "failed-once"))
    log = tmp_path / "ran"
    assert run_ranks(2, _rank_and_world, log) == [(0, 2), (1, 2)]
    # The injected failure costs one launch; a real lost rendezvous under a loaded CI machine may cost
    # another (seen once, 2026-12-07). Each launch takes a port of its own.
    assert len(used) >= 2 and len(set(used)) == len(used), used
    runs = log.read_text().split()
    # fn ran once per rank in the launch that formed (the last), never in the one whose rank 1 failed (the
    # first); a real lost rendezvous may let rank 0 run it in a launch between them (seen once, 2026-12-08).
    assert sorted(r for r in runs if r.startswith(f"{used[-1]}:")) == [f"{used[-1]}:0", f"{used[-1]}:1"], runs
    assert not [r for r in runs if r.startswith(f"{used[0]}:")], runs


def test_a_rendezvous_that_never_forms_names_every_try(tmp_path, monkeypatch):
    def always_fails(*args, **kwargs):
        raise RuntimeError("connection closed by peer")

    monkeypatch.setattr(dist, "init_process_group", always_fails)
    with pytest.raises(AssertionError, match=f"failed to form {harness.RENDEZVOUS_TRIES} times") as info:
        run_ranks(2, _rank_and_world, tmp_path / "ran")
    assert str(info.value).count("could not join the process group") == harness.RENDEZVOUS_TRIES
    assert not (tmp_path / "ran").exists()


def _fails_on_rank_1(rank: int, world_size: int, log: Path) -> int:
    with open(log, "a") as f:
        f.write(f"{rank}\n")
    if rank == 1:
        raise ValueError("the code under test is wrong")
    return rank


def test_a_failing_rank_is_reported_and_not_retried(tmp_path):
    log = tmp_path / "ran"
    with pytest.raises(AssertionError, match="the code under test is wrong") as info:
        run_ranks(2, _fails_on_rank_1, log)
    assert "exit codes" in str(info.value)
    assert log.read_text().split().count("1") == 1


def _result(losses: list[float], w: float) -> dict:
    return {
        "losses": losses,
        "val": {2: losses[-1]},
        "norms": [1.0, 0.5, 0.25],
        "weights": {"w": torch.full((2,), w)},
    }


def _layout(*ranks: dict) -> dict:
    return ranks[0] | {"ranks": list(ranks)}


def test_the_shared_comparisons_catch_a_difference_anywhere():
    ref = _result([3.0, 2.0, 1.0], 0.5)
    assert_trains_like(_layout(ref, ref), ref)
    off_by = 1e-3
    other_rank = _result([3.0, 2.0, 1.0 + off_by], 0.5)
    for got in (_layout(ref, other_rank), _layout(_result([3.0, 2.0, 1.0], 0.5 + off_by))):
        with pytest.raises(AssertionError):
            assert_trains_like(got, ref)
    with pytest.raises(AssertionError, match="progress"):
        assert_trains_like(_layout(ref), _result([1.0, 2.0, 3.0], 0.5))

    resumed = {"losses": [2.0, 1.0], "weights": {"w": torch.full((2,), 0.5)}}
    assert_same_training(resumed, ref, from_step=1)
    with pytest.raises(AssertionError):
        assert_same_training(resumed, ref, from_step=0)
    nudged = resumed | {"weights": {"w": torch.full((2,), 0.5 + 1e-6)}}
    assert_same_training(nudged, ref, from_step=1, exact=False)  # round-off passes where the layout differs
    with pytest.raises(AssertionError):
        assert_same_training(nudged, ref, from_step=1)  # but not where the bits must match
