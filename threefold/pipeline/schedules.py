"""Pipeline schedules as data: pure functions that return every rank's ordered list of actions.

Vocabulary:
  pp_size      pipeline ranks p
  num_model_chunks v: rank r holds virtual stages (chunks) r, r + p, r + 2p, ...
  chunk        a global virtual-stage index c in [0, p*v); chunk c lives on rank c % p
  microbatch   m in [0, num_microbatches)

A schedule lists each rank's compute steps: F(chunk, mb) and B(chunk, mb). `add_communication` lowers
them to actions by adding the point-to-point transfers they imply: a forward of any chunk but the first
receives its input (RECV_F) and, unless it is the last chunk, sends its output (SEND_F); a backward of any
chunk but the last receives its output gradient (RECV_B) and, unless it is the first, sends its input
gradient (SEND_B). After each step, its sends and the next step's receives form one batch that the
executor issues together (batch_isend_irecv): posting both directions at once is what keeps two
neighbours that both send from waiting on each other.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from threefold.pipeline.partition import chunks_of_rank, rank_of_chunk

ScheduleName = Literal["gpipe", "1f1b", "interleaved", "zb-h1", "zb-v"]
"""The schedules this module builds; config.py types `parallel.pipeline_schedule` with it."""
SCHEDULES: tuple[ScheduleName, ...] = typing.get_args(ScheduleName)


class Kind(StrEnum):
    F = "F"
    B = "B"
    W = "W"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"


COMPUTE = (Kind.F, Kind.B, Kind.W)

SPLIT_BACKWARD: frozenset[str] = frozenset({"zb-h1", "zb-v"})
"""Schedules whose backward is two actions: B, the input gradient the previous chunk waits for, and W,
the weight gradient nobody waits for, run later to fill what would be idle time."""
V_SHAPED: frozenset[str] = frozenset({"zb-v"})
"""Schedules that place two chunks per rank in a V (threefold.pipeline.partition)."""


@dataclass(frozen=True)
class Action:
    kind: Kind
    chunk: int
    microbatch: int
    peer: int | None = None
    """The other rank of a transfer (None for compute)."""

    def __str__(self) -> str:
        text = f"{self.kind.value}{self.chunk}.{self.microbatch}"
        return text if self.peer is None else f"{text}@{self.peer}"


def F(chunk: int, mb: int) -> Action:  # noqa: N802 - the schedule vocabulary
    return Action(Kind.F, chunk, mb)


def B(chunk: int, mb: int) -> Action:  # noqa: N802
    return Action(Kind.B, chunk, mb)


def W(chunk: int, mb: int) -> Action:  # noqa: N802
    return Action(Kind.W, chunk, mb)


def check_schedule_args(name: str, pp_size: int, num_model_chunks: int, num_microbatches: int) -> None:
    """ValueError for combinations a schedule cannot run, naming the numbers."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {SCHEDULES}")
    for label, value in (
        ("pp_size", pp_size),
        ("num_model_chunks", num_model_chunks),
        ("num_microbatches", num_microbatches),
    ):
        if value <= 0:
            raise ValueError(f"{label} must be positive, got {value}")
    if name in ("1f1b", "zb-h1") and num_model_chunks != 1:
        raise ValueError(
            f"the {name} schedule runs one model chunk per rank (num_model_chunks = {num_model_chunks}); "
            "use the interleaved or zb-v schedule for more"
        )
    if name == "zb-v":
        if num_model_chunks != 2:
            raise ValueError(
                f"the zb-v schedule runs exactly two model chunks per rank, in a V "
                f"(num_model_chunks = {num_model_chunks})"
            )
        return  # any micro-batch count: its order is not built from groups of pp_size
    if num_model_chunks > 1 and pp_size == 1:
        raise ValueError(f"num_model_chunks ({num_model_chunks}) > 1 needs pp_size > 1")
    if num_model_chunks > 1 and num_microbatches % pp_size:
        raise ValueError(
            f"with num_model_chunks ({num_model_chunks}) > 1 the {name} schedule needs num_microbatches "
            f"({num_microbatches}) to be a multiple of pp_size ({pp_size})"
        )


Step = list[Action]
"""Compute actions that run back to back before the next batch of transfers: one F, one B, or an F and
a B (the interleaved steady state, whose transfers travel together after both)."""


def _virtual_order(rank: int, pp_size: int, num_model_chunks: int, num_microbatches: int, forward: bool):
    """(chunk, micro-batch) of the k-th forward (or backward) on `rank` in interleaved order: micro-batches in
    groups of pp_size per chunk, chunk by chunk; backwards start from the last chunk."""
    p, v = pp_size, num_model_chunks

    def at(k: int) -> tuple[int, int]:
        local_chunk = (k // p) % v
        if not forward:
            local_chunk = v - 1 - local_chunk
        return rank + local_chunk * p, (k // (p * v)) * p + k % p

    return at


def gpipe(rank: int, pp_size: int, num_model_chunks: int, num_microbatches: int) -> list[Step]:
    """All forwards, then all backwards: every micro-batch in flight at the turn."""
    m, v = num_microbatches, num_model_chunks
    if v == 1:
        return [[F(rank, mb)] for mb in range(m)] + [[B(rank, mb)] for mb in range(m)]
    # Several chunks: visit them in interleaved order, so a rank never sends a whole chunk's worth of
    # activations to a neighbour that is itself waiting to send (which would deadlock).
    fwd = _virtual_order(rank, pp_size, v, m, forward=True)
    bwd = _virtual_order(rank, pp_size, v, m, forward=False)
    return [[F(*fwd(k))] for k in range(m * v)] + [[B(*bwd(k))] for k in range(m * v)]


def one_f_one_b(rank: int, pp_size: int, num_model_chunks: int, num_microbatches: int) -> list[Step]:
    """PipeDream-Flush: at most pp_size - rank micro-batches in flight on rank `rank`."""
    assert num_model_chunks == 1
    m = num_microbatches
    num_warmup = min(pp_size - rank - 1, m)
    steps: list[Step] = []
    # Warm-up: fill the pipeline.
    steps += [[F(rank, mb)] for mb in range(num_warmup)]
    # Steady state: one forward, one backward.
    for i in range(m - num_warmup):
        steps += [[F(rank, num_warmup + i)], [B(rank, i)]]
    # Cool-down: drain the backwards still owed.
    steps += [[B(rank, mb)] for mb in range(m - num_warmup, m)]
    return steps


def interleaved(rank: int, pp_size: int, num_model_chunks: int, num_microbatches: int) -> list[Step]:
    """Interleaved 1F1B (Narayanan et al. 2021): rank r holds v chunks; the bubble shrinks by v.

    With v = 1 it is exactly 1F1B.
    """
    p, v, m = pp_size, num_model_chunks, num_microbatches
    if v == 1:
        return one_f_one_b(rank, p, 1, m)
    total = m * v
    fwd = _virtual_order(rank, p, v, m, forward=True)
    bwd = _virtual_order(rank, p, v, m, forward=False)
    if m == p:
        num_warmup = total  # nothing to overlap: all forwards, then all backwards
    else:
        num_warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    # Warm-up: forwards only.
    steps: list[Step] = [[F(*fwd(k))] for k in range(num_warmup)]
    # Steady state: a forward and a backward, then their transfers together.
    steps += [[F(*fwd(num_warmup + k)), B(*bwd(k))] for k in range(total - num_warmup)]
    # Cool-down: the remaining backwards.
    steps += [[B(*bwd(k))] for k in range(total - num_warmup, total)]
    return steps


def forward_only(
    rank: int, pp_size: int, num_model_chunks: int, num_microbatches: int, v_shape: bool = False
) -> list[Step]:
    """Evaluation: each micro-batch through this rank's chunks in turn; works for any micro-batch count."""
    chunks = chunks_of_rank(rank, pp_size, num_model_chunks, v_shape)
    return [[F(c, mb)] for mb in range(num_microbatches) for c in chunks]


BUILDERS: dict[str, Callable[[int, int, int, int], list[Step]]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved,
}


def builder(name: str) -> Callable[[int, int, int, int], list[Step]]:
    """The function (rank, pp_size, num_model_chunks, num_microbatches) -> steps of schedule `name`."""
    if name in BUILDERS:
        return BUILDERS[name]
    from threefold.pipeline import zero_bubble  # it builds on this module's vocabulary

    return {"zb-h1": zero_bubble.zb_h1, "zb-v": zero_bubble.zb_v}[name]


# Inside a batch, activations go before gradients on both sides, so two neighbours that exchange both
# (pp_size = 2: next and previous are the same rank) match their messages in the same order.
_ORDER = {Kind.SEND_F: 0, Kind.RECV_F: 1, Kind.SEND_B: 2, Kind.RECV_B: 3}


def add_communication(
    steps: list[Step], rank: int, pp_size: int, num_model_chunks: int, v_shape: bool = False
) -> list[Action]:
    """Lower compute steps to actions: after each step, one batch with its sends and the receives the next
    step needs (the receives of the first step come first). Neighbouring chunks on the same rank (the tip
    of the V) hand their tensors over without a transfer."""
    last_chunk = pp_size * num_model_chunks - 1

    def owner(chunk: int) -> int:
        return rank_of_chunk(chunk, pp_size, v_shape)

    def receives(step: Step) -> list[Action]:
        out = []
        for a in step:
            if a.kind is Kind.F and a.chunk > 0 and owner(a.chunk - 1) != rank:
                out.append(Action(Kind.RECV_F, a.chunk, a.microbatch, owner(a.chunk - 1)))
            elif a.kind is Kind.B and a.chunk < last_chunk and owner(a.chunk + 1) != rank:
                out.append(Action(Kind.RECV_B, a.chunk, a.microbatch, owner(a.chunk + 1)))
        return out

    def sends(step: Step) -> list[Action]:
        out = []
        for a in step:
            if a.kind is Kind.F and a.chunk < last_chunk and owner(a.chunk + 1) != rank:
                out.append(Action(Kind.SEND_F, a.chunk, a.microbatch, owner(a.chunk + 1)))
            elif a.kind is Kind.B and a.chunk > 0 and owner(a.chunk - 1) != rank:
                out.append(Action(Kind.SEND_B, a.chunk, a.microbatch, owner(a.chunk - 1)))
        return out

    actions = receives(steps[0]) if steps else []
    for i, step in enumerate(steps):
        actions += step
        following = receives(steps[i + 1]) if i + 1 < len(steps) else []
        actions += sorted(sends(step) + following, key=lambda a: _ORDER[a.kind])
    return actions


def compute_actions(
    name: str, rank: int, pp_size: int, num_model_chunks: int, num_microbatches: int
) -> list[Action]:
    """The rank's forwards and backwards in order, without transfers."""
    return [a for step in builder(name)(rank, pp_size, num_model_chunks, num_microbatches) for a in step]


def build_schedule(
    name: str, pp_size: int, num_model_chunks: int, num_microbatches: int
) -> list[list[Action]]:
    """Every rank's action list, transfers included."""
    check_schedule_args(name, pp_size, num_model_chunks, num_microbatches)
    build = builder(name)
    return [
        add_communication(
            build(r, pp_size, num_model_chunks, num_microbatches),
            r,
            pp_size,
            num_model_chunks,
            name in V_SHAPED,
        )
        for r in range(pp_size)
    ]


def batches(actions: list[Action]) -> list[list[Action]]:
    """Group a rank's actions: each compute action alone, consecutive transfers together."""
    groups: list[list[Action]] = []
    for a in actions:
        if a.kind in COMPUTE or not groups or groups[-1][0].kind in COMPUTE:
            groups.append([a])
        else:
            groups[-1].append(a)
    return groups
