"""Python's garbage collector on the training loop's schedule (training.gc_interval)."""

import gc
import weakref

import pytest
import torch
from distributed import run_ranks

from threefold.parallel.mesh import build_mesh
from threefold.reliability.collector import CollectorSchedule


class _Node:
    """A container that can sit in a reference cycle."""

    def __init__(self) -> None:
        self.other: object = None


def _cycle() -> weakref.ref:
    """Two objects that refer to each other and to nothing else: only a collection frees them."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def collector_state():
    """Python's collector as the test found it, put back after."""
    enabled, threshold = gc.isenabled(), gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    (gc.enable if enabled else gc.disable)()


def test_the_schedule_turns_automatic_collection_off_and_collects_when_due(collector_state):
    gc.enable()
    gc.set_threshold(1)  # the automatic collector would run at nearly every allocation
    seen: list[int] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(record)
    try:
        with CollectorSchedule(3) as collector:
            assert not gc.isenabled()
            seen.clear()  # any from before the block (the threshold of 1 makes them likely)
            garbage = [_cycle() for _ in range(100)]
            assert seen == [], "no automatic collection inside the block"
            assert all(ref() is not None for ref in garbage), "cycles stay until a collection"
            assert [collector.due(done) for done in range(1, 8)] == [True] * 7, "the first is due at once"
            collector.collect()
            assert seen == [2], "a full collection"
            assert all(ref() is None for ref in garbage)
            assert gc.get_freeze_count() > 0, "what survived the first collection is frozen"
            due = [done for done in range(1, 10) if collector.due(done)]
            assert due == [3, 6, 9], "then every third step"
            late = _cycle()
            collector.collect()
            assert late() is None, "a cycle made after the freeze is collected"
            assert collector.collections == 2 and collector.seconds > 0
        assert gc.isenabled(), "the automatic collector back on after the block"
        assert gc.get_freeze_count() == 0, "the frozen objects back in the collector's sight"
    finally:
        gc.callbacks.remove(record)


def test_interval_zero_changes_nothing(collector_state):
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        with CollectorSchedule(0) as collector:
            assert gc.isenabled() == enabled
            assert not any(collector.due(done) for done in range(1, 10))
        assert gc.isenabled() == enabled


def test_a_collector_left_off_stays_off(collector_state):
    gc.disable()
    with CollectorSchedule(2) as collector:
        collector.collect()
    assert not gc.isenabled()
    with pytest.raises(ValueError, match=r"^training\.gc_interval must be >= 0, got -1$"):
        CollectorSchedule(-1)


def _collections_in_the_loop(rank: int, world: int, config) -> dict:
    """Train with every collection's start recorded against the number of steps queued by then."""
    import threefold.train as train_module
    from threefold.train import train

    queued, seen = [0], []
    step_fn = train_module.train_step

    def counting_step(*args, **kwargs):
        queued[0] += 1
        return step_fn(*args, **kwargs)

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append(queued[0])

    train_module.train_step = counting_step
    gc.set_threshold(10)  # left on, the automatic collector would run many times a step
    gc.callbacks.append(record)
    try:
        result = train(config, build_mesh(1, world, 1), torch.device("cpu"))
    finally:
        gc.callbacks.remove(record)
    inside = [steps for steps in seen if 0 < steps < 8]  # between the first step and the last
    return {"inside": inside, "losses": result.losses, "collections": result.collections}


def test_the_loop_collects_on_every_rank_after_the_same_steps(sonnets_dataset, tmp_path):
    """gc_interval 2 over 8 steps on two data-parallel ranks: each rank collects after steps 1 (and
    freezes), 2, 4 and 6, not after the last, and never on its own schedule in between; the losses are
    those of the automatic collector."""
    from tiny import tiny_config

    def run(name: str, interval: int) -> list[dict]:
        config = tiny_config(
            sonnets_dataset, tmp_path / name, dp=2,
            training=dict(max_steps=8, eval_interval=0, gc_interval=interval),
        )  # fmt: skip
        return run_ranks(2, _collections_in_the_loop, config)

    scheduled, automatic = run("scheduled", 2), run("automatic", 0)
    for rank in scheduled:
        assert rank["inside"] == [1, 2, 4, 6]
        assert rank["collections"] == 4
    assert all(rank["collections"] == 0 for rank in automatic)
    assert scheduled[0]["losses"] == automatic[0]["losses"] and len(scheduled[0]["losses"]) == 8
