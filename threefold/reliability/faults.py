"""Test-only fault injection: make one rank die, hang, slow down, get a signal or produce NaNs on purpose.

Switched on by the environment variable THREEFOLD_FAULT, read once at start-up by the CLI (`threefold
train`), never by the training code itself. It holds faults separated by ';', each a kind followed by
`key=value` options separated by ':':

    kill:rank=1:step=5         SIGKILL this process at the start of step 5 (0-based) on rank 1
    term:rank=0:step=3         send SIGTERM to itself (what a scheduler does before preempting)
    stall:rank=1:step=3        sleep (default forever; seconds=S for S seconds) before step 3's work
    slow:rank=1:seconds=0.05   sleep this long at the start of every step from `step` (default 0) on
    nan:step=4:count=2         fill the gradient buffers with NaN before steps 4 and 5 (all ranks)
    spike:step=6:factor=30     multiply the weights by `factor` before step 6 (a loss spike; fp32 only)

Options: `rank` (default: every rank), `step` (default 0), `count` (steps in a row, default 1; `slow`
defaults to every step), `seconds`, `factor`, and `attempt` (default 0): the fault fires only in that
attempt of a job restarted by torchrun (TORCHELASTIC_RESTART_COUNT), so a killed run does not die again
on resume.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

KINDS = ("kill", "term", "stall", "slow", "nan", "spike")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int | None = None
    """The rank it hits (None: every rank)."""
    step: int = 0
    count: int = 1
    seconds: float = math.inf
    factor: float = 10.0
    attempt: int = 0

    def due(self, rank: int, step: int) -> bool:
        return (self.rank is None or self.rank == rank) and self.step <= step < self.step + self.count


def parse_faults(spec: str) -> list[Fault]:
    """The faults of a THREEFOLD_FAULT value; ValueError naming the bad part."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, *options = part.split(":")
        if kind not in KINDS:
            raise ValueError(f"THREEFOLD_FAULT {part!r}: unknown fault {kind!r}; known: {', '.join(KINDS)}")
        values: dict[str, Any] = {"count": 2**62 if kind == "slow" else 1}
        for option in options:
            key, _, value = option.partition("=")
            try:
                if key in ("rank", "step", "count", "attempt"):
                    values[key] = int(value)
                elif key in ("seconds", "factor"):
                    values[key] = float(value)
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"THREEFOLD_FAULT {part!r}: bad option {option!r}; use rank=, step=, count=, "
                    "seconds=, factor= or attempt= with a number"
                ) from None
        if kind == "slow" and "seconds" not in values:
            raise ValueError(f"THREEFOLD_FAULT {part!r}: slow needs seconds=S")
        faults.append(Fault(kind, **values))
    return faults


class FaultPlan:
    """The faults of this process's attempt, applied at the start of each training step."""

    def __init__(self, faults: list[Fault], *, attempt: int = 0) -> None:
        self.faults = [f for f in faults if f.attempt == attempt]

    def __bool__(self) -> bool:
        return bool(self.faults)

    def before_step(self, rank: int, step: int, weights: Sequence[nn.Parameter]) -> None:
        """Inject whatever is due now into the next gradients (`nan`) or the weights (`spike`)."""
        for f in self.faults:
            if not f.due(rank, step):
                continue
            if f.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif f.kind == "term":
                os.kill(os.getpid(), signal.SIGTERM)
            elif f.kind in ("stall", "slow"):
                end = time.monotonic() + f.seconds
                while time.monotonic() < end:  # short sleeps: signal handlers and the watchdog still run
                    time.sleep(min(0.1, max(0.0, end - time.monotonic())))
            elif f.kind == "nan":
                for w in weights:
                    _poison_next_gradient(w)
            elif f.kind == "spike":
                for w in weights:
                    w.data.mul_(f.factor)


def _poison_next_gradient(param: nn.Parameter) -> None:
    """Make the next gradient computed for `param` all NaN (as a bad batch would), once.

    A tensor hook, not a write into the gradient buffer: the first micro-batch of a step overwrites
    the buffer (see data_parallel.GradSync).
    """
    fired = False

    def hook(grad: torch.Tensor) -> torch.Tensor | None:
        nonlocal fired
        if fired:
            return None
        fired = True
        return torch.full_like(grad, float("nan"))

    param.register_hook(hook)


def faults_from_env(env: dict[str, str] | None = None) -> FaultPlan | None:
    """The plan THREEFOLD_FAULT asks for in this attempt, or None (the normal case)."""
    env = dict(os.environ) if env is None else env
    spec = env.get("THREEFOLD_FAULT", "")
    if not spec:
        return None
    plan = FaultPlan(parse_faults(spec), attempt=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")))
    return plan or None
