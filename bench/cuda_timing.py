"""Timing a GPU function with CUDA events, for the bench scripts beside this file (imported as a sibling:
`python bench/<script>.py` puts this folder on the path)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch


def median_ms(fn: Callable[[], Any], iters: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of one call of fn over `iters` calls, each timed alone by CUDA events, after
    `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rounds_ms(fns: dict[str, Callable[[], Any]], rounds: int, iters: int = 20) -> dict[str, list[float]]:
    """`median_ms` of each function once a round, the order turned by one place each round, so that a GPU
    warming up or falling back to a lower clock under its power limit weighs on every function alike; each
    function's list holds one figure a round."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(median_ms(fns[name], iters=iters))
    return times


def median_and_range(ms: list[float], minus: float = 0.0) -> tuple[float, str]:
    """One function's `rounds_ms` figures as the median of the rounds and their range ("min-max"), each
    less `minus` (a cost every call pays and the table leaves out)."""
    return statistics.median(ms) - minus, f"{min(ms) - minus:.3f}-{max(ms) - minus:.3f}"
