"""metrics.jsonl across resumes: the steps after the checkpoint are logged once, not twice."""

import json
from types import SimpleNamespace

import pytest
import torch

from threefold.config import build_config
from threefold.monitor import drop_records_after
from threefold.report import Reporter


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_drop_records_after_keeps_earlier_steps_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "train/loss": 5.0 - s} for s in range(1, 6)] + [{"step": 4, "val/loss": 1.0}]
    _write(path, records, tail='{"step": 6, "train/lo')
    assert drop_records_after(path, 3) == 4
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    assert drop_records_after(path, 3) == 0
    assert drop_records_after(tmp_path / "missing.jsonl", 3) == 0


def _reporter(tmp_path, start_step):
    config = build_config(
        {"logging": dict(out_dir=str(tmp_path), progress=False, tensorboard=False, plot=False)},
        check_paths=False,
    )
    mesh = SimpleNamespace(world_size=1, rank=0)
    return Reporter(config, mesh, torch.device("cpu"), enabled=True, start_step=start_step)  # type: ignore[arg-type]


def test_a_resumed_run_does_not_log_the_rerun_steps_twice(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": s, "train/loss": 1.0} for s in range(1, 5)])
    reporter = _reporter(tmp_path, start_step=2)  # resumed from the checkpoint of step 2
    reporter.writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    _reporter(tmp_path, start_step=0).writer.close()  # a fresh run starts a fresh file
    assert path.read_text() == ""


class _Clock:
    """A stand-in for time.perf_counter that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _steps(first: int, count: int):
    from threefold.report import StepStats

    return [
        StepStats(step=s, loss=2.0, grad_norm=1.0, lr=1e-3, skipped=False)
        for s in range(first, first + count)
    ]


def _speeds(path):
    return [
        r["perf/step_seconds"]
        for r in map(json.loads, path.read_text().splitlines())
        if "perf/step_seconds" in r
    ]


def test_speed_leaves_out_evaluations_and_saves_inside_the_window(tmp_path, monkeypatch):
    """4 steps of 1 s with a 10 s evaluation and a 6 s save among them: 1 s per step, not less or more."""
    clock = _Clock()
    monkeypatch.setattr("threefold.report.time.perf_counter", clock)
    reporter = _reporter(tmp_path, start_step=0)
    with reporter:
        clock.now += 2.0  # steps 1 and 2
        with reporter.pause():
            clock.now += 10.0  # an evaluation between two log intervals
        clock.now += 1.0  # step 3
        with reporter.pause():
            clock.now += 6.0  # a checkpoint save
        clock.now += 1.0  # step 4
        reporter.interval(_steps(1, 4))
        clock.now += 3.0  # a window without pauses: steps 5-7
        reporter.interval(_steps(5, 3))
    assert _speeds(tmp_path / "metrics.jsonl") == [1.0] * 7


def test_the_run_ends_with_the_median_speed_after_the_warm_up(tmp_path, monkeypatch):
    """`Reporter.speed`: the median tokens/s of the steps after the first 10 (steps 2-10 are slow
    here: compilation); a run too short for that takes every step after the first."""
    from threefold.report import WARMUP_STEPS

    clock = _Clock()
    monkeypatch.setattr("threefold.report.time.perf_counter", clock)
    reporter = _reporter(tmp_path, start_step=0)
    tokens = reporter.tokens_per_step
    with reporter:
        assert reporter.speed() is None
        clock.now += 50.0
        reporter.interval(_steps(0, 1))  # step 1: not a speed at all
        for step in range(1, 40):
            clock.now += 4.0 if step < WARMUP_STEPS else 1.0 + 0.01 * (step % 3)
            reporter.interval(_steps(step, 1))
    speed = reporter.speed()
    assert speed is not None and speed.steps == 39 - (WARMUP_STEPS - 1)
    assert speed.tokens_per_s == pytest.approx(tokens / 1.01)  # the median of 1.00, 1.01, 1.02 s steps
    assert speed.peak_memory_gib is None and "tokens/s/device over the last 30 steps" in speed.describe()

    short = _reporter(tmp_path / "short", start_step=0)
    with short:
        for step, seconds in enumerate([50.0, 4.0, 2.0, 2.0]):
            clock.now += seconds
            short.interval(_steps(step, 1))
    assert short.speed() == type(speed)(tokens / 2.0, 3, None)  # median of 4, 2, 2 s
