"""Python's garbage collector on the training loop's schedule (`training.gc_interval`).

Python's automatic collector starts a collection whenever enough container objects have been made since
the last one. A full collection walks every object the process holds, and a compiled model's graphs,
guards and code are many: tens of milliseconds on a large model. Each rank reaches that point at a step of
its own, and since every collective waits for the slowest rank, in a run of many ranks each rank's pauses
stall all of them in turn. Under a schedule the automatic collector is off inside the loop and every rank
collects after the same steps, so the pauses fall together.

What lives through the run's first step (the model, the optimizer, the compiled code) is moved out of the
collector's sight once that step's garbage is gone (`gc.freeze`), so a scheduled collection walks only what
the loop made since: it stays cheap however large the compiled program. Objects freed by reference counts
(nearly all of a step's tensors) go at once either way; the collector is only for reference cycles.
"""

from __future__ import annotations

import gc
import time
from types import TracebackType


class CollectorSchedule:
    """The collector off for a `with` block; `collect` after the steps `due` names.

    `interval` 0 changes nothing: Python's automatic collector stays as it was.
    """

    def __init__(self, interval: int) -> None:
        if interval < 0:
            raise ValueError(f"training.gc_interval must be >= 0, got {interval}")
        self.interval = interval
        self.collections = 0
        """Scheduled collections so far."""
        self.seconds = 0.0
        """Time they took, in all."""
        self._was_enabled = False
        self._frozen = False

    def __enter__(self) -> CollectorSchedule:
        if self.interval:
            self._was_enabled = gc.isenabled()
            gc.disable()
        return self

    def due(self, done: int) -> bool:
        """Whether to collect after `done` steps (counted from the run's start, resumed runs included):
        after this process's first step, when the surviving objects are frozen too, and after every
        multiple of the interval."""
        return bool(self.interval) and (not self._frozen or done % self.interval == 0)

    def collect(self) -> None:
        """A full collection now; the first one freezes what survives it."""
        began = time.perf_counter()
        gc.collect()
        if not self._frozen:
            gc.freeze()
            self._frozen = True
        self.seconds += time.perf_counter() - began
        self.collections += 1

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if not self.interval:
            return
        if self._frozen:
            gc.unfreeze()  # back among the objects the collector watches, for whatever runs next
            self._frozen = False
        if self._was_enabled:
            gc.enable()
