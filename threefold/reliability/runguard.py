"""The reliability pieces wired into the training loop: data check, resume, watchdog, guards, rollback.

check_data     start-up: the dataset fits the model and is intact (threefold.data.dataset.check_dataset);
               one rank scans the token files, every rank raises the same error.
resume         start-up: the newest checkpoint of `checkpoint.dir` that every rank can load (falling
               back past damaged ones), else `checkpoint.load`; so a run restarted by torchrun
               (--max-restarts) or relaunched by a scheduler continues with no flag.
RunGuard       around the loop: the communication tracker and watchdog thread (reliability.watchdog),
               the per-step stop agreement (reliability.control), the skip counter, the loss-spike
               detector and the straggler check (reliability.detectors), and test-only faults
               (threefold.reliability.faults).
rollback       on a loss spike: reload the newest checkpoint saved before the spike and go on with
               the next data (PaLM's remedy): the step number and data position are not rewound, so
               the batches around the spike are skipped rather than replayed into the same spike.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from threefold.checkpoint import (
    Checkpointer,
    TrainState,
    checkpoints_newest_first,
    load_checkpoint,
    load_manifest,
)
from threefold.checkpoint.parts import named_parameters
from threefold.config import Config
from threefold.data.dataset import BatchLoader, check_dataset
from threefold.files import RunLock
from threefold.parallel.mesh import Mesh
from threefold.parallel.track import CommTracker, activate
from threefold.reliability.control import ControlChannel
from threefold.reliability.detectors import SkipCounter, SpikeDetector, StragglerDetector
from threefold.reliability.events import EventLog
from threefold.reliability.faults import FaultPlan
from threefold.reliability.watchdog import Watchdog
from threefold.report import StepStats


def check_data(config: Config, control: ControlChannel, rank: int) -> None:
    """ValueError on every rank if the dataset is unusable (rank 0 scans the token ids)."""
    try:
        check_dataset(config.data.path, model_vocab_size=config.model.vocab_size, scan=rank == 0)
        error = None
    except ValueError as e:
        error = str(e)
    error = control.broadcast(error) or error  # the same message everywhere, even if only rank 0 scanned
    if error:
        raise ValueError(error)


@contextlib.contextmanager
def hold_run_directories(config: Config, control: ControlChannel, rank: int) -> Iterator[None]:
    """One writer per run: rank 0 locks `logging.out_dir` and `checkpoint.dir` for the whole run.

    A second run writing the same directories fails on every rank before it writes anything, with a
    message naming the run that holds them (its pid, host and start time); see threefold.files.RunLock.
    """
    with contextlib.ExitStack() as locks:
        error = None
        if rank == 0:
            dirs = dict.fromkeys(
                Path(d).resolve() for d in (config.logging.out_dir, config.checkpoint.dir) if d
            )
            try:
                for directory in dirs:
                    locks.enter_context(RunLock(directory))
            except RuntimeError as e:
                error = str(e)
        error = control.broadcast(error)
        if error:
            raise ValueError(error)
        yield


def resume(trainer: TrainState, loader: BatchLoader, control: ControlChannel, events: EventLog) -> int:
    """Load the newest checkpoint every rank can load; returns the step to start at (0: fresh run)."""
    ckpt = trainer.config.checkpoint
    candidates = checkpoints_newest_first(ckpt.dir) if ckpt.dir else []
    from_dir = bool(candidates)
    if not candidates and ckpt.load:
        candidates = [Path(ckpt.load)]
    failures = []
    for path in candidates:
        try:
            manifest, error = load_checkpoint(trainer, path), ""
        except ValueError as e:
            manifest, error = None, str(e)
        # Load or skip together: ranks that loaded it will be overwritten by the next candidate.
        if control.agree([float(bool(error))])[0] == 0:
            assert manifest is not None
            loader.load_state_dict({"consumed_samples": manifest["consumed_samples"]})
            if from_dir:
                events.write("resume", path=str(path), step=int(manifest["step"]))
            return int(manifest["step"])
        failures.append(f"{path}: {error or 'unusable on another rank'}")
        events.write("bad_checkpoint", path=str(path), error=error)
    if failures:
        raise ValueError(
            "no checkpoint could be loaded: " + "; ".join(failures) + ". Move the damaged directories out of "
            f"{ckpt.dir or ckpt.load!r} to start from an older one (or from scratch)"
        )
    return 0


def rollback(trainer: TrainState, checkpointer: Checkpointer, root: str, before_step: int) -> int | None:
    """Reload the newest checkpoint saved after fewer than `before_step` steps; returns its step."""
    checkpointer.finish(trainer)  # an asynchronous save still in flight is committed first
    for path in checkpoints_newest_first(root):
        try:
            step = load_manifest(path)["step"]
        except ValueError:
            continue  # a damaged checkpoint (resume reports those): an older one will do
        if step < before_step:
            load_checkpoint(trainer, path)
            return step
    return None


class RunGuard:
    """Per-run reliability state on one rank; enter it around the training loop."""

    def __init__(
        self, config: Config, mesh: Mesh, control: ControlChannel, *, faults: FaultPlan | None = None
    ) -> None:
        r = config.reliability
        self.config = config
        self.mesh = mesh
        self.control = control
        self.faults = faults
        self.events = EventLog(config.logging.out_dir, rank=mesh.rank)
        names = {mesh.tp_group: "tp", mesh.dp_group: "dp", mesh.pp_group: "pp",
                 mesh.model_parallel_group: "mp", control.group: "control"}  # fmt: skip
        if mesh.embedding_group is not None:
            names[mesh.embedding_group] = "embedding"
        self.tracker = CommTracker(mesh.rank, names)
        self.watchdog: Watchdog | None = None
        if r.watchdog_timeout > 0:
            # A fresh key space per run: a restarted job must not read the previous attempt's alarm.
            token = control.broadcast(secrets.token_hex(8))
            store = dist.PrefixStore(
                f"threefold/watchdog/{token}/", dist.distributed_c10d._get_default_store()
            )
            self.watchdog = Watchdog(
                self.tracker, store=store, world_size=mesh.world_size, timeout=r.watchdog_timeout,
                events=self.events,
            )  # fmt: skip
        self.skips = SkipCounter(r.max_consecutive_skips, checkpoint_dir=config.checkpoint.dir)
        self.spikes = SpikeDetector(r.spike_factor, r.spike_window) if r.spike_rollback else None
        self.stragglers = StragglerDetector(r.straggler_threshold, r.straggler_intervals)
        self._activation = activate(self.tracker)
        self._busy = 0.0
        self._began = 0.0
        self._comm_at_begin = 0.0

    def __enter__(self) -> RunGuard:
        self._activation.__enter__()
        if self.watchdog is not None:
            self.watchdog.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        self._activation.__exit__(*exc)

    def begin_step(self, step: int, trainer: TrainState) -> None:
        self.tracker.step = step
        self.tracker.action = "step start"
        self._began = time.monotonic()
        self._comm_at_begin = self.tracker.comm_seconds
        if self.faults:
            # Every weight this rank holds, so that data-parallel replicas stay alike under ZeRO too.
            self.faults.before_step(self.mesh.rank, step, list(named_parameters(trainer).values()))

    def end_step(self, *, stop_requested: bool, out_of_time: bool) -> tuple[bool, bool]:
        """Busy-time bookkeeping, then every rank's agreement on (stop requested, out of time)."""
        elapsed = time.monotonic() - self._began
        self._busy += elapsed - (self.tracker.comm_seconds - self._comm_at_begin)
        self.tracker.action = "stop agreement"
        stop, late = self.control.agree([float(stop_requested), float(out_of_time)])
        return stop > 0, late > 0

    def interval(self, synced: list[StepStats], note: Callable[[str], None]) -> int | None:
        """Act on one log interval's steps; returns the 0-based step of a loss spike to roll back from.

        Raises NumericsError after too many consecutive skipped steps (on every rank alike).
        `note` prints a line on the logging rank.
        """
        logger = self.mesh.rank == 0
        for s in synced:
            step, loss, norm = s.step, s.loss, s.grad_norm
            if s.skipped:
                if logger:
                    self.events.write("skipped_step", step=step + 1, loss=str(loss), grad_norm=str(norm))
                note(f"step {step + 1}: non-finite loss ({loss}) or grad norm ({norm}); update skipped "
                     f"({self.skips.consecutive + 1} in a row, {self.skips.total + 1} in all)")  # fmt: skip
            self.skips.observe(step, s.skipped)
        busy = [b[0] for b in self.control.gather([self._busy])]
        self._busy = 0.0
        for rank, ratio in self.stragglers.observe(busy):
            text = (f"rank {rank} is a straggler: busy {ratio:.2f}x the other ranks' median for "
                    f"{self.stragglers.intervals} log intervals (busy seconds by rank: "
                    f"{[round(b, 3) for b in busy]})")  # fmt: skip
            if logger:
                self.events.write(
                    "straggler", step=synced[-1].step + 1, slow_rank=rank, ratio=ratio, busy=busy
                )
            note(text)
        if self.spikes is not None:
            for s in synced:
                if not s.skipped and self.spikes.observe(s.loss):
                    if logger:
                        self.events.write("loss_spike", step=s.step + 1, loss=s.loss, mean=self.spikes.mean)
                    return s.step
        return None
