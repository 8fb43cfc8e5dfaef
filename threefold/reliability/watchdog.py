"""Hang detection: what each rank is waiting in, and which ranks never arrived.

Two pieces per rank:

* A `CommTracker` (threefold.parallel.track) records, cheaply and on the training thread, the current
  step, the schedule action or phase, and per process group and peer pair how many communication
  operations this rank has entered, and what it waits in now.

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
from typing import Any

from threefold.parallel.track import CommTracker
from threefold.reliability.events import EventLog

HANG_EXIT_CODE = 75
"""Exit status of a rank that reported (or was told of) a hang; non-zero so torchrun restarts the job."""


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
