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
