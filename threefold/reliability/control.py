"""Stopping together: signals, the preemption deadline, and the per-step agreement between ranks.

Signals. SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (Slurm's warning before it preempts a job, with
`--signal=USR1@120`) only set a flag; the loop finishes its step, saves a checkpoint and returns, and the
process exits 0. SIGTERM and SIGUSR1 also start a timer of `reliability.preemption_deadline` seconds:
a rank still running when it rings (stuck in I/O, or its peers already gone) exits with
PREEMPTION_EXIT_CODE, so the scheduler's grace period is never overrun. A second Ctrl-C gives up on the
clean stop: the process leaves at once with INTERRUPTED_EXIT_CODE and no traceback (raising
KeyboardInterrupt instead would unwind through collectives whose peers are leaving too, and each rank
would print the error of its broken connection). Outside the loop (start-up, the final save), a worker
has nothing to stop cleanly, and one Ctrl-C leaves the same way (`leave_on_interrupt`).

Parent death. A worker started by a launcher (threefold's own, or torchrun's agent) asks the kernel to
SIGKILL it when that launcher dies (`die_with_parent`), so a launcher killed with SIGKILL, or by the OOM
killer, leaves no orphans holding the devices and training on alone.

Agreement. Every rank must stop after the same step, but a signal may reach only some of them, at
different moments. After every step the ranks all-reduce (MAX) a two-number CPU tensor, (stop
requested, out of time), over a gloo group created once at start-up. On CPU it is a few microseconds; on
GPUs it involves no device synchronization (the tensor never leaves host memory), so the host keeps
queueing work ahead of the GPU, while the stop still lands within one step of the signal. Piggybacking on
the log-interval sync instead would save the microseconds but could overrun a short deadline when
log_interval is large.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from threefold.parallel import track

PREEMPTION_EXIT_CODE = 143
"""Exit status of a rank that could not stop cleanly within the preemption deadline (128 + SIGTERM)."""

INTERRUPTED_EXIT_CODE = 130
"""Exit status after Ctrl-C without a clean stop (128 + SIGINT), the shell's convention."""

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Turns SIGINT/SIGTERM/SIGUSR1 into a flag the loop checks after every step."""

    def __init__(self, deadline: float = 0.0) -> None:
        self.deadline = deadline
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._timer: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> StopRequest:
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test harness): no handler
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested:  # a second Ctrl-C: give up on the clean stop
            _leave(signum, frame)
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        if signum != signal.SIGINT and self.deadline > 0 and self._timer is None:
            self._timer = threading.Timer(self.deadline, self._expired)
            self._timer.daemon = True
            self._timer.start()

    def _expired(self) -> None:
        print(
            f"threefold: {self.signal_name} received {self.deadline:g} s ago and this rank has not finished "
            f"its step and checkpoint (reliability.preemption_deadline); exiting with code "
            f"{PREEMPTION_EXIT_CODE}. The previous checkpoint stays intact.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(PREEMPTION_EXIT_CODE)

    def __exit__(self, *exc: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _leave(signum: int, frame: Any) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(INTERRUPTED_EXIT_CODE)


def leave_on_interrupt() -> None:
    """From now on, Ctrl-C ends this process at once with INTERRUPTED_EXIT_CODE (StopRequest overrides
    this inside the training loop). For workers: their launcher reports the interrupt."""
    signal.signal(signal.SIGINT, _leave)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when `parent_pid`, its parent, dies (however it dies).

    On Linux the kernel does it (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread polls getppid()
    once a second. The parent may have died before the request was made: a changed parent (the orphan's
    new reaper) means it has.
    """
    if not _kernel_kills_orphan():
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _kernel_kills_orphan() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


class ControlChannel:
    """Small host-side collectives on a gloo group of all ranks, for decisions every rank must share."""

    def __init__(self) -> None:
        # A separate gloo group: CPU tensors, no device sync, and no interleaving with the data traffic.
        self.group = dist.new_group(backend="gloo")
        self.world_size = dist.get_world_size()

    def agree(self, flags: list[float]) -> list[float]:
        """Element-wise maximum of `flags` over all ranks."""
        t = torch.tensor(flags, dtype=torch.float64)
        with track.collective(self.group, "all_reduce(stop flags)"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()

    def gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values`, by rank."""
        t = torch.tensor(values, dtype=torch.float64)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        with track.collective(self.group, "all_gather(timings)"):
            dist.all_gather(out, t, group=self.group)
        return [o.tolist() for o in out]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a picklable object)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
