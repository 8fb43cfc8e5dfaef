"""Hang detection: what each rank is waiting in, and which ranks never arrived.

Two pieces per rank:

* A `CommTracker` records, cheaply and on the training thread, the current step, the schedule action or
  phase, and for every process group (and every pipeline peer pair) how many collectives / point-to-point
  operations this rank has entered. While a rank is blocked in one, the tracker also holds what it waits
  in and since when. The call sites are one-line context managers (`collective`, `transfer`,
  `waiting_for`) around each communication call in comm, layers, pipeline, data_parallel, optim and
  train. They reach the tracker through a process-wide slot (`activate`), not through arguments:
  collectives run inside autograd functions deep in the layers, and threading a diagnostic object
  through every layer's signature would widen all of them for a debugging aid. The slot holds progress
  counters only, never the mesh or a group.

* A `Watchdog` thread polls the tracker. When this rank has waited longer than the timeout, it writes its
  state to the rendezvous store, raises an alarm key there, collects the other ranks' states for a short
  grace period, and reports (stderr and `events.jsonl`) the ranks that never arrived: for each group, the
  members whose counter is behind the group's furthest member, or that did not answer at all (dead, or
  hung while holding the interpreter). Every other rank's watchdog sees the alarm, publishes its own
  state and leaves too. All exit with HANG_EXIT_CODE, so torchrun (--max-restarts) restarts the job and
  it resumes from the last checkpoint.

Counters match across ranks because every member of a group enters the group's collectives in the same
order, and every point-to-point operation between two ranks has exactly one partner operation: rank a's
count of operations with b equals b's count with a once both have posted them.

On CUDA, NCCL calls return as soon as they are queued, so a rank's wait shows up at the next host sync
(tracked as `waiting_for`); the counters still say which rank never queued its part. Checkpoint writes
are not tracked: a slow file system must not look like a hang.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed import ProcessGroup

from threefold.events import EventLog

HANG_EXIT_CODE = 75
"""Exit status of a rank that reported (or was told of) a hang; non-zero so torchrun restarts the job."""


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


def laggards(states: dict[int, dict[str, Any] | None]) -> dict[int, list[str]]:
    """Ranks that are behind in some group, with the groups: rank -> ["dp[0,1] at #13 of 14", ...].

    `states` maps every rank to its published state, or None when it never answered; a silent rank is
    behind in every group it belongs to.
    """
    members: dict[str, list[int]] = {}
    for s in states.values():
        if s is not None:
            members.update(s["members"])
    behind: dict[int, list[str]] = {}
    for key, ranks in sorted(members.items()):
        counts = {r: (states[r] or {}).get("counts", {}).get(key, 0) for r in ranks if states.get(r)}
        if not counts:
            continue
        furthest = max(counts.values())
        for r in ranks:
            if r not in counts:
                behind.setdefault(r, []).append(f"{key}: no answer")
            elif counts[r] < furthest:
                behind.setdefault(r, []).append(f"{key} at #{counts[r]} of {furthest}")
    for r, s in states.items():
        if s is None:
            behind.setdefault(r, []).insert(0, "no answer")
    return dict(sorted(behind.items()))


def _describe(s: dict[str, Any]) -> str:
    w = s["waiting"]
    where = "not in a collective" if w is None else (
        f"waiting {w['seconds']:.1f} s in {w['op']} on "
        + ", ".join(f"{k} #{n}" for k, n in zip(w["keys"], w["seqs"], strict=True))
    )  # fmt: skip
    return f"rank {s['rank']}: step {s['step']}, action {s['action']!r}, {where}"


def hang_report(me: dict[str, Any], states: dict[int, dict[str, Any] | None], timeout: float) -> str:
    """The text a timed-out rank prints: its own wait, who never arrived, then every rank's state."""
    w = me["waiting"]
    lines = [
        f"threefold watchdog: rank {me['rank']} waited {w['seconds']:.1f} s (timeout {timeout:g} s) at step "
        f"{me['step']}, action {me['action']!r}, in {w['op']} on "
        + ", ".join(f"{k} #{n}" for k, n in zip(w["keys"], w["seqs"], strict=True))
    ]
    behind = laggards(states)
    mine = set(w["keys"])
    culprits = {r: why for r, why in behind.items() if any(x.split(" ")[0].rstrip(":") in mine for x in why)}
    culprits = culprits or behind
    if culprits:
        lines.append(
            "  never arrived: " + "; ".join(f"rank {r} ({', '.join(why)})" for r, why in culprits.items())
        )
    else:
        lines.append("  every rank arrived: the collective itself is stuck (network or library)")
    for r in sorted(states):
        s = states[r]
        lines.append("  " + (_describe(s) if s is not None else f"rank {r}: no answer"))
    return "\n".join(lines)


class Watchdog:
    """A background thread that reports and ends a rank stuck in communication longer than `timeout`."""

    def __init__(
        self,
        tracker: CommTracker,
        *,
        store: Any,
        world_size: int,
        timeout: float,
        events: EventLog | None = None,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        self.tracker = tracker
        self.store = store
        self.world_size = world_size
        self.timeout = timeout
        self.events = events
        self._exit = exit
        self.poll = max(0.05, min(1.0, timeout / 10))
        self.grace = min(30.0, max(2.0, 5 * self.poll))
        """How long a timed-out rank collects the others' states before it reports."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="threefold-watchdog", daemon=True)
        self.report: str | None = None

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        # The store is asked less often than the tracker is read: on a large job every rank's question
        # goes to one server, and an answer within half the grace period is all the reporter needs.
        store_every = max(self.poll, self.grace / 2)
        next_store_check = time.monotonic() + store_every
        while not self._stop.wait(self.poll):
            wait = self.tracker.waiting
            try:
                if wait is not None and time.monotonic() - wait.since > self.timeout:
                    self._fire()
                    return
                if time.monotonic() >= next_store_check:
                    next_store_check = time.monotonic() + store_every
                    if self.store.check(["alarm"]):
                        self._respond()
                        return
            except Exception as e:  # the store went away (the job is ending): nothing left to watch
                if not self._stop.is_set():
                    print(
                        f"threefold watchdog (rank {self.tracker.rank}): store error {e!r}", file=sys.stderr
                    )
                return

    def _publish(self) -> dict[str, Any]:
        state = self.tracker.state()
        self.store.set(f"state/{self.tracker.rank}", json.dumps(state))
        return state

    def _fire(self) -> None:
        me = self._publish()
        self.store.set("alarm", str(self.tracker.rank))
        keys = [f"state/{r}" for r in range(self.world_size)]
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and not self.store.check(keys):
            time.sleep(self.poll / 2)
        states = {
            r: json.loads(self.store.get(k)) if self.store.check([k]) else None for r, k in enumerate(keys)
        }
        states[self.tracker.rank] = me
        self.report = hang_report(me, states, self.timeout)
        print(self.report, file=sys.stderr, flush=True)
        if self.events is not None:
            self.events.write("hang", step=me["step"], rank=me["rank"], report=self.report,
                              never_arrived=sorted(laggards(states)))  # fmt: skip
        self._exit(HANG_EXIT_CODE)

    def _respond(self) -> None:
        self._publish()
        first = self.store.get("alarm").decode()
        print(
            f"threefold watchdog (rank {self.tracker.rank}): rank {first} reported a hang; "
            f"this rank was at step {self.tracker.step}; leaving so the job can restart",
            file=sys.stderr,
            flush=True,
        )
        # Leave the reporting rank time to read this rank's state before the connections drop.
        if not self._stop.wait(2 * self.grace):
            self._exit(HANG_EXIT_CODE)
