"""Pure detectors for bad numerics, loss spikes and slow ranks; threefold.reliability.runguard acts on them.

Skipped steps. The optimizer skips an update whose loss or global gradient norm is not finite (see
`Optimizer.step(found_inf=...)`): weights, Adam moments and Adam's step count stay as they were. The
norm is reduced over the model-parallel group from data-parallel-averaged gradients, and the loss over
pipeline and data-parallel ranks, so every rank sees the same value and skips the same steps without
talking about it. A skipped step still consumes its batch and still counts as a step: the learning-rate
schedule and the data position move on with the step number, so a skip never shifts the schedule of the
rest of the run, and a resumed run stays aligned. The host learns of skips at the next log sync, so a
run of `max_consecutive_skips` is noticed within one log interval; the weights are those of the last
good step either way, and so are any checkpoints saved meanwhile.

Loss spikes. A logged loss above `factor` times the mean of the last `window` good losses is a spike;
what to do about it (roll back) is the caller's business.

Stragglers. Collectives are periodic and all ranks take part in each, so every rank's wall time per
step is the same; what differs is how much of it a rank spends computing versus waiting for the others.
A healthy rank's busy time (step time minus tracked communication waits) is close to the others'
median; a rank consistently above `threshold` times that median is the faulty component the others wait for.
Only ranks of one pipeline stage do the same work, so only they are compared (see StragglerDetector).
The times are host times, gathered over the gloo control group at each log interval (no device sync).
On GPUs they catch slow hosts (data loading, CPU contention, a throttled node's driver thread) fully but
a slow GPU only where its lateness reaches the host, since NCCL waits happen on the device.
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque


class NumericsError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class SkipCounter:
    """Counts skipped steps; raises NumericsError after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int, *, checkpoint_dir: str = "") -> None:
        self.max_consecutive = max_consecutive
        self.checkpoint_dir = checkpoint_dir
        self.total = 0
        self.consecutive = 0
        self._first_bad: int | None = None

    def observe(self, step: int, skipped: bool) -> None:
        """Record 0-based `step`; raises once the streak reaches the limit."""
        if not skipped:
            self.consecutive, self._first_bad = 0, None
            return
        self.total += 1
        self.consecutive += 1
        if self._first_bad is None:
            self._first_bad = step
        if self.consecutive >= self.max_consecutive:
            where = (
                f"the newest checkpoint in {self.checkpoint_dir!r} is intact"
                if self.checkpoint_dir
                else "no checkpoint.dir is set, so nothing was saved"
            )
            raise NumericsError(
                f"stopping: {self.consecutive} optimizer steps in a row (steps {self._first_bad + 1}.."
                f"{step + 1}) had a non-finite loss or gradient norm (reliability.max_consecutive_skips = "
                f"{self.max_consecutive}). No update was applied, so the weights are those after step "
                f"{self._first_bad} and {where}. Lower optimizer.lr or raise optimizer.warmup_steps, "
                "look for bad samples near that data position, then resume."
            )


class SpikeDetector:
    """Flags a loss above `factor` x the mean of the last `window` good (non-spike, finite) losses."""

    def __init__(self, factor: float, window: int) -> None:
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=window)

    def observe(self, loss: float) -> bool:
        if loss != loss or loss in (float("inf"), float("-inf")):
            return False  # a skipped step: the numerics guard's business
        if len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.factor * mean:
                return True
        self.recent.append(loss)
        return False

    @property
    def mean(self) -> float:
        return sum(self.recent) / max(1, len(self.recent))


class StragglerDetector:
    """Names ranks whose busy time stays above `threshold` x their peers' median for `intervals` intervals.

    Peers are the ranks doing the same work: `peer_groups[rank]` labels each rank's group (its pipeline
    stage: the last stage also runs the output layer and the loss, the first the embedding, so stages
    are not compared with each other). A rank alone in its group is compared with its own median over
    its last `history` intervals, which catches a rank that slows down.
    """

    def __init__(
        self, threshold: float, intervals: int, peer_groups: list[int] | None = None, history: int = 8
    ) -> None:
        self.threshold = threshold
        self.intervals = intervals
        self.peer_groups = peer_groups
        self.streak: dict[int, int] = {}
        self.past: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=history))

    def observe(self, busy: list[float]) -> list[tuple[int, float]]:
        """Busy seconds per rank for one interval -> [(rank, ratio to median)] that just became stragglers."""
        if self.threshold <= 0:
            return []
        groups = self.peer_groups or [0] * len(busy)
        reported = []
        for rank, seconds in enumerate(busy):
            peers = [busy[r] for r in range(len(busy)) if r != rank and groups[r] == groups[rank]]
            baseline = peers or list(self.past[rank])  # works with 2 ranks; alone: against itself
            self.past[rank].append(seconds)
            if not baseline:
                continue
            median = statistics.median(baseline)
            ratio = seconds / median if median > 0 else 1.0
            if ratio > self.threshold:
                self.streak[rank] = self.streak.get(rank, 0) + 1
                if self.streak[rank] == self.intervals:  # once per streak
                    reported.append((rank, ratio))
            else:
                self.streak.pop(rank, None)
        return reported
