"""The reliability pieces wired into the training loop: data check, resume, watchdog, guards, rollback.

check_data     start-up: the dataset fits the model and is intact (threefold.data.dataset.check_dataset);
               one rank scans the token files, every rank raises the same error.
resume         start-up: the newest checkpoint of `checkpoint.dir` that every rank can load (falling
               back past damaged ones), else `checkpoint.load` (everything, or the weights alone to
               fine-tune); so a run restarted by torchrun (--max-restarts) or relaunched by a
               scheduler continues with no flag, a fine-tune included.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch.distributed as dist

from threefold.checkpoint import (
    Checkpointer,
    Manifest,
    TrainState,
    checkpoints_newest_first,
    load_checkpoint,
    load_manifest,
)
from threefold.checkpoint.parts import named_parameters
from threefold.config import Config, DataSource
from threefold.config.validate import checkpoint_to_load
from threefold.data.blend import check_compatible
from threefold.data.dataset import SampleLoader, check_dataset, read_meta
from threefold.data.tokenizer import find_tokenizer, vocabulary_difference
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
        for source in config.data.datasets():
            check_dataset(source.path, model_vocab_size=config.model.vocab_size, scan=rank == 0)
        if config.data.sources:
            check_compatible([(s.label, s.path) for s in config.data.sources])
        if rank == 0:
            check_tokenizer(config)
        error = None
    except ValueError as e:
        error = str(e)
    error = control.broadcast(error) or error  # the same message everywhere, even if only rank 0 scanned
    if error:
        raise ValueError(error)


def check_tokenizer(config: Config) -> None:
    """ValueError if `checkpoint.load` carries a tokenizer (an `import-hf` checkpoint does) whose vocabulary
    differs from the one a dataset was prepared with: its token ids would mean other words to the model,
    and the vocabulary-size check alone passes whenever the model's vocabulary is the larger."""
    if not config.checkpoint.load:
        return
    try:
        checkpoint = checkpoint_to_load(config.checkpoint)
    except ValueError:
        return  # reported, with its reasons, where the checkpoint is loaded
    own = find_tokenizer(checkpoint)
    if own is None:
        return
    for source in config.data.datasets():
        used = str(read_meta(source.path)["tokenizer"])
        try:
            difference = vocabulary_difference(used, str(own))
        except ValueError as exc:
            raise ValueError(
                f"dataset {source.path!r} was prepared with tokenizer {used!r}, which cannot be loaded to "
                f"compare with the tokenizer of checkpoint.load ({str(own)!r}): {exc}"
            ) from exc
        if difference:
            raise ValueError(
                f"dataset {source.path!r} was prepared with tokenizer {used!r}, but checkpoint.load "
                f"{config.checkpoint.load!r} carries its own tokenizer ({str(own)!r}) and {difference}; "
                f"prepare the data with it: threefold data prepare ... --tokenizer {str(checkpoint)!r}"
            )


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


@dataclass(frozen=True)
class Start:
    """Where a run starts (see `resume`): from scratch, or from `path`, with its progress."""

    step: int = 0
    """The step the loop starts at (0 for a fresh run and for a fine-tune)."""
    path: Path | None = None
    how: Literal["fresh", "resumed", "loaded", "weights"] = "fresh"
    """'resumed': the run's own newest checkpoint; 'loaded': `checkpoint.load`, everything restored;
    'weights': `checkpoint.load`, weights only (fine-tuning)."""
    consumed_samples: int = 0
    saved_step: int = 0
    """The step the checkpoint was saved at (for 'weights' the run starts at 0 regardless)."""
    skipped: tuple[str, ...] = ()
    """Damaged checkpoints of the run's own directory passed over, each 'path: why'."""

    def describe(self, max_steps: int) -> str:
        """The console line saying what the run started from ('' for a fresh run)."""
        if self.path is None:
            return ""
        if self.how == "weights":
            return (f"loaded the weights of {self.path} (saved at step {self.saved_step}) for fine-tuning: "
                    "a fresh optimizer, from step 0 and the start of the data")  # fmt: skip
        source = "checkpoint.load: " if self.how == "loaded" else ""
        line = (
            f"resumed from {self.path} ({source}step {self.step}, {self.consumed_samples:,} samples consumed)"
        )
        if self.skipped:
            line += f"; passed over {len(self.skipped)} damaged: " + "; ".join(self.skipped)
        if self.step >= max_steps:
            line += f"; training.max_steps ({max_steps}) is reached already, so there is nothing to train"
        return line


def resume(trainer: TrainState, loader: SampleLoader, control: ControlChannel, events: EventLog) -> Start:
    """Load what the run starts from on every rank; returns where it starts.

    The precedence (CheckpointConfig): the newest checkpoint of `checkpoint.dir` that every rank can load
    (falling back past damaged ones) when it holds any, so a restarted run always continues itself;
    else `checkpoint.load` as `load_mode` says (that one checkpoint, or a ValueError); else from scratch.
    """
    ckpt = trainer.config.checkpoint
    own = checkpoints_newest_first(ckpt.dir) if ckpt.dir else []
    if own:
        return _load_newest(trainer, loader, control, events, own)
    if not ckpt.load:
        return Start()
    path = checkpoint_to_load(ckpt)
    weights_only = ckpt.load_mode == "weights"
    manifest, error = _load_together(trainer, control, path, weights_only=weights_only)
    if manifest is None:
        raise ValueError(f"checkpoint.load: {error}")
    events.write("load", path=str(path), step=int(manifest["step"]), mode=ckpt.load_mode)
    if weights_only:
        return Start(path=path, how="weights", saved_step=int(manifest["step"]))
    return _continue(loader, path, manifest, how="loaded")


def _load_newest(
    trainer: TrainState,
    loader: SampleLoader,
    control: ControlChannel,
    events: EventLog,
    candidates: list[Path],
) -> Start:
    """The newest of `candidates` every rank loads; a ValueError naming each failure if none."""
    failures: list[str] = []
    for path in candidates:
        manifest, error = _load_together(trainer, control, path, weights_only=False)
        if manifest is not None:
            events.write("resume", path=str(path), step=int(manifest["step"]))
            return replace(_continue(loader, path, manifest, how="resumed"), skipped=tuple(failures))
        failures.append(f"{path}: {error}")
        events.write("bad_checkpoint", path=str(path), error=error)
    raise ValueError(
        "no checkpoint could be loaded: " + "; ".join(failures) + ". Move the damaged directories out of "
        f"{trainer.config.checkpoint.dir!r} to start from an older one (or from scratch)"
    )


def _load_together(
    trainer: TrainState, control: ControlChannel, path: Path, *, weights_only: bool
) -> tuple[Manifest | None, str]:
    """(manifest, '') when every rank loaded `path`; else (None, the first failing rank's error), alike on
    every rank, so that it is reported once. A rank that did load is overwritten by the next candidate."""
    try:
        manifest: Manifest | None = load_checkpoint(trainer, path, weights_only=weights_only)
        error = ""
    except ValueError as e:
        manifest, error = None, str(e)
    errors: list[str] = [""] * dist.get_world_size(control.group)
    dist.all_gather_object(errors, error, group=control.group)
    first = next(((r, e) for r, e in enumerate(errors) if e), None)
    if first is None:
        return manifest, ""
    rank, text = first
    return None, f"{text} (on rank {rank})" if rank else text


def _saved_blend(manifest: Manifest) -> dict:
    """A blend's checkpoint (data.sources) names its sources, weights and seed in its config: the loader
    refuses to continue its stream under another blend (the position would mean other samples)."""
    saved = manifest["config"]
    sources = saved.get("data", {}).get("sources")
    if not sources:
        return {}
    blend = [[DataSource(**s).label, s["weight"]] for s in sources]
    return {"blend": blend, "seed": saved["training"]["seed"]}


def _continue(
    loader: SampleLoader, path: Path, manifest: Manifest, *, how: Literal["resumed", "loaded"]
) -> Start:
    """Resume the data where the checkpoint left it."""
    consumed, step = int(manifest["consumed_samples"]), int(manifest["step"])
    loader.load_state_dict({"consumed_samples": consumed} | _saved_blend(manifest))
    return Start(step=step, path=path, how=how, consumed_samples=consumed, saved_step=step)


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
        if mesh.cp_size > 1:
            names |= {mesh.cp_group: "cp", mesh.dp_cp_group: "dp_cp"}
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
        stage_of = {
            int(rank): stage for stage in range(mesh.grid.shape[0]) for rank in mesh.grid[stage].flatten()
        }
        self.stragglers = StragglerDetector(
            r.straggler_threshold,
            r.straggler_intervals,
            peer_groups=[stage_of[i] for i in range(mesh.world_size)],
        )
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
            text = (f"rank {rank} is a straggler: busy {ratio:.2f}x its peers' median for "
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
