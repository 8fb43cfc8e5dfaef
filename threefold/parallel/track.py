"""Communication progress of this rank: the cheap tracker the numerics record into.

A `CommTracker` records, on the training thread, the current step, the schedule action or phase, and for
every process group (and every pipeline peer pair) how many collectives / point-to-point operations this
rank has entered; while a rank is blocked in one, it also holds what it waits in and since when. The call
sites are one-line context managers (`collective`, `transfer`, `waiting_for`) around each communication
call in the parallel layers, the pipeline executor, the optimizer and the training step. They reach the
tracker through one process-wide slot (`activate`), not through arguments: collectives run inside
autograd functions deep in the layers, and threading a diagnostic object through every layer's signature
would widen all of them for a debugging aid. The slot holds progress counters only, never the mesh or a
group, and with no tracker active every call site is a no-op.

This module is all the numerics know of hang detection; the thread that reads the tracker and ends a
stuck process lives in `threefold.reliability.watchdog`.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class Wait:
    op: str
    keys: tuple[str, ...]
    seqs: tuple[int, ...]
    """This rank's counter of each key including this operation."""
    since: float


class _Tracked:
    __slots__ = ("tracker", "wait")

    def __init__(self, tracker: CommTracker, wait: Wait) -> None:
        self.tracker = tracker
        self.wait = wait

    def __enter__(self) -> None:
        self.tracker.waiting = self.wait

    def __exit__(self, *exc: Any) -> None:
        self.tracker.waiting = None
        self.tracker.comm_seconds += time.monotonic() - self.wait.since


class CommTracker:
    """This rank's communication progress; written by the training thread, read by the watchdog."""

    def __init__(self, rank: int, names: dict[ProcessGroup, str] | None = None) -> None:
        self.rank = rank
        self.step = -1
        self.action: Any = "start-up"
        """The schedule action(s) or phase running now (formatted only when reported)."""
        self.counts: dict[str, int] = {}
        self.members: dict[str, tuple[int, ...]] = {}
        self.waiting: Wait | None = None
        self.comm_seconds = 0.0
        """Seconds spent in tracked communication so far (for the straggler check)."""
        self._names = dict(names or {})
        self._keys: dict[ProcessGroup, str] = {}

    def _key(self, group: ProcessGroup | None) -> str:
        pg: Any = group if group is not None else dist.group.WORLD
        key = self._keys.get(pg)
        if key is None:
            ranks = tuple(dist.get_process_group_ranks(pg))
            name = self._names.get(pg, "world" if pg is dist.group.WORLD else "group")
            key = f"{name}[{','.join(map(str, ranks))}]"
            self._keys[pg] = key
            self.members[key] = ranks
        return key

    def _count(self, key: str, n: int = 1) -> int:
        value = self.counts.get(key, 0) + n
        self.counts[key] = value
        return value

    def collective(self, group: ProcessGroup | None, op: str) -> _Tracked:
        """Enter a collective on `group`: count it, and mark this rank as waiting in it until exit."""
        key = self._key(group)
        return _Tracked(self, Wait(op, (key,), (self._count(key),), time.monotonic()))

    def waiting_for(self, group: ProcessGroup | None, op: str) -> _Tracked:
        """Wait for a collective already entered (an async handle, a host sync): mark, do not count."""
        key = self._key(group)
        return _Tracked(self, Wait(op, (key,), (self.counts.get(key, 0),), time.monotonic()))

    def transfer(self, peers: list[int]) -> _Tracked:
        """Enter a batch of point-to-point operations, one per entry of `peers` (repeats allowed)."""
        per_peer: dict[int, int] = {}
        for peer in peers:
            per_peer[peer] = per_peer.get(peer, 0) + 1
        keys, seqs = [], []
        for peer, n in per_peer.items():
            pair = (min(peer, self.rank), max(peer, self.rank))
            key = f"p2p[{pair[0]},{pair[1]}]"
            self.members[key] = pair
            keys.append(key)
            seqs.append(self._count(key, n))
        return _Tracked(self, Wait("send/recv", tuple(keys), tuple(seqs), time.monotonic()))

    def state(self) -> dict[str, Any]:
        """What this rank reports when a hang is detected (JSON-serializable)."""
        waiting = self.waiting
        action = self.action
        if isinstance(action, list | tuple):
            action = " ".join(map(str, action))
        return {
            "rank": self.rank,
            "step": self.step,
            "action": str(action),
            "waiting": None
            if waiting is None
            else {"op": waiting.op, "keys": list(waiting.keys), "seqs": list(waiting.seqs),
                  "seconds": round(time.monotonic() - waiting.since, 3)},
            "counts": dict(self.counts),
            "members": {k: list(v) for k, v in dict(self.members).items()},
        }  # fmt: skip


# The process-wide slot the call sites use (see the module docstring for why it is not an argument).
_active: CommTracker | None = None
_NULL = nullcontext()


class activate:  # noqa: N801 - used like a function: `with activate(tracker):`
    """Make `tracker` the one the call sites record into, for the duration of the block."""

    def __init__(self, tracker: CommTracker) -> None:
        self.tracker = tracker

    def __enter__(self) -> CommTracker:
        global _active
        _active = self.tracker
        return self.tracker

    def __exit__(self, *exc: Any) -> None:
        global _active
        _active = None


def collective(group: ProcessGroup | None, op: str) -> Any:
    """`with collective(group, "all_reduce"):` around a collective call (a no-op with no tracker)."""
    t = _active
    return _NULL if t is None else t.collective(group, op)


def waiting_for(group: ProcessGroup | None, op: str) -> Any:
    t = _active
    return _NULL if t is None else t.waiting_for(group, op)


def transfer(peers: list[int]) -> Any:
    t = _active
    return _NULL if t is None else t.transfer(peers)


def set_action(action: Any) -> None:
    """Record the schedule action(s) or phase this rank is in (formatted only if a hang is reported)."""
    t = _active
    if t is not None:
        t.action = action
