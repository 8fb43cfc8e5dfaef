"""bench/cuda_timing.py's rounds: each function timed once a round, the order turned each round (the timer
itself needs CUDA; here a stand-in records the order)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench"
SPEC = importlib.util.spec_from_file_location("cuda_timing", BENCH / "cuda_timing.py")
assert SPEC is not None and SPEC.loader is not None
timing = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(timing)


def test_rounds_turn_the_order_and_keep_one_figure_a_round_per_function(monkeypatch):
    calls: list[str] = []

    def fake_median_ms(fn, iters=20, warmup=5):
        calls.append(fn())
        return float(len(calls))

    monkeypatch.setattr(timing, "median_ms", fake_median_ms)
    times = timing.rounds_ms({name: (lambda name=name: name) for name in "abc"}, rounds=4)
    assert ["".join(calls[i : i + 3]) for i in range(0, 12, 3)] == ["abc", "bca", "cab", "abc"]
    assert times == {"a": [1.0, 6.0, 8.0, 10.0], "b": [2.0, 4.0, 9.0, 11.0], "c": [3.0, 5.0, 7.0, 12.0]}


def test_median_and_range_less_a_common_cost():
    assert timing.median_and_range([3.0, 1.0, 2.0]) == (2.0, "1.000-3.000")
    assert timing.median_and_range([3.0, 1.0, 2.0], minus=0.5) == (1.5, "0.500-2.500")
