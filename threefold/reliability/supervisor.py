"""Watching a machine's workers from their launcher: signals, the first failure, the exit status.

The first worker to fail ends the run: the launcher names it (the signal that killed it, the last step
the run logged, its newest checkpoint), stops the others and exits with the worker's status (128 + N for
signal N, as a shell reports it). Ctrl-C reaches the workers from the terminal: after the first, they
finish the step and save; after a second, they leave at once and the launcher exits with status 130.

A worker that stops on an error it can explain (a user error, status 2; too many non-finite steps,
status 3) prints it with `report_once`: one line per run, not one per rank, since the ranks usually meet
the same error at the same point. The launcher then adds nothing and lets the other workers leave on
their own for REPORT_GRACE seconds; only those still running after it are named and stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from threefold.config import Config
from threefold.reliability.control import INTERRUPTED_EXIT_CODE, SIGNALS


class LauncherSignals:
    """The launcher's signal handling while its workers run.

    Ctrl-C is counted, not forwarded: a terminal sends it to the workers too. SIGTERM and SIGUSR1 (a
    scheduler's preemption warning) are forwarded, so the workers save a checkpoint and stop.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.interrupts = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            return
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def __enter__(self) -> LauncherSignals:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self.procs:  # only when the launcher itself failed: no worker outlives it
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


STOP_GRACE = 60.0
"""Seconds the workers get after a Ctrl-C to finish their step and save, before they are killed."""

USER_ERROR_EXIT_CODE = 2
"""A worker's status after a user error (a ValueError: bad data, a checkpoint that will not load, a run
directory in use), the CLI's own status for one."""
NUMERICS_EXIT_CODE = 3
"""A worker's status after too many non-finite steps in a row (reliability.detectors.NumericsError)."""
REPORTED_EXIT_CODES = (USER_ERROR_EXIT_CODE, NUMERICS_EXIT_CODE)
"""Statuses of a worker that has printed why it stopped (or whose peer has: `report_once`)."""
REPORT_GRACE = 10.0
"""Seconds the other workers get to leave on their own after one exits with a reported status."""


def report_once(text: str, code: int) -> int:
    """Print `text` on stderr unless another worker of this run has printed the same text; returns `code`.

    The data check, the run-directory lock and resume agree on one message on every rank, and the skip
    counter stops every rank after the same step: without this each of N workers would print it. The
    workers share their launcher's rendezvous store (the default store of the process group), where the
    first to count a key named by the text prints it. With no store to ask, printing twice beats never.
    """
    import torch.distributed as dist

    key = "threefold/reported/" + hashlib.sha256(text.encode()).hexdigest()
    try:
        first = dist.distributed_c10d._get_default_store().add(key, 1) == 1
    except (RuntimeError, ValueError):  # no process group, or its store is gone
        first = True
    if first:
        print(text, file=sys.stderr, flush=True)
    return code


def supervise(signals: LauncherSignals, progress: ProgressNote) -> int:
    """Wait for the workers; the first failure stops the rest. Returns the run's exit status."""
    live = dict(enumerate(signals.procs))
    code, seen, deadline = 0, 0, math.inf
    reported: tuple[int, int] | None = None  # (rank, status) of a worker that printed why it stopped
    report_deadline = math.inf
    while live:
        ended = {rank: rc for rank, p in live.items() if (rc := p.poll()) is not None}
        for rank in ended:
            del live[rank]
        # A peer's death breaks the others' collectives within milliseconds, so ranks may end in the
        # same sweep: one killed by a signal is the likelier cause than one that exited with an error.
        failed = sorted((rc >= 0, rank, rc) for rank, rc in ended.items() if rc != 0)
        if failed and code == 0 and not signals.interrupts:
            _, rank, rc = failed[0]
            code = 128 - rc if rc < 0 else rc  # killed by a signal: the shell's 128 + N
            if rc in REPORTED_EXIT_CODES:
                # Its peers most likely stop on the same error; the one that prints it may be among them.
                reported, report_deadline = (rank, rc), time.monotonic() + REPORT_GRACE
            else:
                _stop_the_others(live, rank, rc, progress)
        if reported is not None and live and time.monotonic() > report_deadline:
            _stop_the_others(live, *reported, progress)  # stuck in a collective with the one that left
            reported = None
        if signals.interrupts > seen:
            seen = signals.interrupts
            if seen == 1:
                print("threefold: Ctrl-C: the workers stop after this step and save a checkpoint "
                      "(Ctrl-C again to leave at once)", file=sys.stderr, flush=True)  # fmt: skip
                deadline = time.monotonic() + STOP_GRACE
            elif seen == 2:
                print("threefold: second Ctrl-C: the workers leave without saving; the newest checkpoint "
                      "stays", file=sys.stderr, flush=True)  # fmt: skip
                deadline = min(deadline, time.monotonic() + 5)
        if time.monotonic() > deadline:
            for p in live.values():
                p.kill()
        time.sleep(0.05)
    return INTERRUPTED_EXIT_CODE if signals.interrupts else code


def _stop_the_others(live: dict[int, subprocess.Popen], rank: int, rc: int, progress: ProgressNote) -> None:
    """Name the failed worker, then kill the others: they would wait forever in a collective. (SIGTERM
    would ask them to save a checkpoint, which needs the dead peer; the last checkpoint stays instead.)"""
    print(_failure(rank, rc, len(live), progress()), file=sys.stderr, flush=True)
    for other in live.values():
        other.kill()


def _failure(rank: int, rc: int, others: int, progress: str) -> str:
    how = f"was killed by {_signal_name(-rc)}" if rc < 0 else f"exited with status {rc}"
    stopping = f"; stopping the other {others} rank{'s' if others != 1 else ''}" if others else ""
    return f"threefold: rank {rank} {how}{f' ({progress})' if progress else ''}{stopping}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class ProgressNote:
    """The last step a local run is known to have reached, read from its files when a worker dies.

    Cheap and after the fact: the logging rank's last `metrics.jsonl` row (every log_interval steps) and
    the checkpoint `latest` names, so the training loop pays nothing for it.
    """

    def __init__(self, config: Config | None) -> None:
        self.metrics = Path(config.logging.out_dir) / "metrics.jsonl" if config else None
        self.checkpoints = Path(config.checkpoint.dir) if config and config.checkpoint.dir else None
        self.began = time.time()

    def __call__(self) -> str:
        if self.metrics is None:
            return ""
        step = _last_logged_step(self.metrics, since=self.began)
        notes = [f"last logged step {step}" if step is not None else "no step logged yet"]
        latest = self.checkpoints / "latest" if self.checkpoints else None
        if latest is not None and latest.is_file():
            notes.append(f"newest checkpoint {latest.read_text().strip()}")
        return ", ".join(notes)


def _last_logged_step(path: Path, *, since: float) -> int | None:
    """The step of the last training row of a metrics.jsonl written since `since` (a time.time())."""
    try:
        if path.stat().st_mtime < since:
            return None  # an earlier run's file
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short, by the crash or by the 64 KiB window
        if isinstance(row, dict) and "train/loss" in row and isinstance(row.get("step"), int):
            return int(row["step"])
    return None
