"""Play every rank's action list without processes: deadlocks, message order, bubble, memory.

Model of execution (the executor's, and NCCL's): a rank runs its actions in order. A batch of transfers
is posted all at once and completes when every transfer in it has met its partner, a send meeting the
receive posted by the peer (with the backward split, schedules with W actions, sends are eager: the
executor posts them and moves on, a batch waits for its receives only, and activations and gradients
travel with different tags, so each kind keeps its own order); transfers between two ranks meet in
FIFO order (the k-th send from a to b meets the k-th receive on b from a), so the simulator also proves
that each receive gets the tensor it expects. Transfers take no time; computing takes the given costs.

Costs: a forward takes forward_cost; with the backward split (zero-bubble schedules) B takes backward_cost
and W weight_cost, and an unsplit backward takes their sum, so the same three numbers compare every
schedule. Memory: a forward's activations count as in flight until its B, the paper's measure (what W
still needs, the inputs of each linear layer and their output gradients, is a fraction of it).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field

from threefold.pipeline.schedules import COMPUTE, Action, Kind, batches, build_schedule


class ScheduleError(RuntimeError):
    """The action lists cannot run: a deadlock, a mismatched transfer, or a missing dependency."""


@dataclass
class SimResult:
    makespan: float
    ideal: float
    """Busy time of one rank: its forwards and backwards back to back."""
    peak_in_flight: list[int]
    """Per rank, the most (chunk, micro-batch) forwards whose backward (B) had not yet run."""
    starts: list[list[tuple[float, Action]]] = field(default_factory=list)
    """Per rank, each compute action with its start time."""

    @property
    def bubble_fraction(self) -> float:
        """Idle time over busy time: (p - 1) / m for GPipe and 1F1B, (p - 1) / (v m) interleaved."""
        return (self.makespan - self.ideal) / self.ideal


def _payload(a: Action) -> tuple[str, int, int]:
    """What a transfer carries: the activation leaving a chunk, or the gradient entering one."""
    if a.kind is Kind.SEND_F:
        return ("activation", a.chunk, a.microbatch)
    if a.kind is Kind.RECV_F:
        return ("activation", a.chunk - 1, a.microbatch)
    if a.kind is Kind.SEND_B:
        return ("gradient", a.chunk, a.microbatch)
    return ("gradient", a.chunk + 1, a.microbatch)  # RECV_B


def _is_send(a: Action) -> bool:
    return a.kind in (Kind.SEND_F, Kind.SEND_B)


@dataclass
class _Rank:
    """One rank's progress through its action list."""

    groups: list[list[Action]]
    """The list as the executor runs it: single compute actions and batches of transfers."""
    position: int = 0
    clock: float = 0.0
    open_batch: list[list] | None = None
    """The queue entries of the posted, not yet complete batch of transfers."""
    received: set[tuple[str, int, int]] = field(default_factory=set)
    """Payloads (see _payload) that arrived."""
    forwarded: set[tuple[int, int]] = field(default_factory=set)
    """(chunk, micro-batch) of each forward run; `backwarded` the same for backwards (B), `weighted` for
    weight gradients (W)."""
    backwarded: set[tuple[int, int]] = field(default_factory=set)
    weighted: set[tuple[int, int]] = field(default_factory=set)
    in_flight: int = 0
    """Forwards whose backward has not run yet; `peak` is its maximum."""
    peak: int = 0
    starts: list[tuple[float, Action]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.position == len(self.groups)


class _Simulator:
    """The state of one simulation; `run` plays every rank until all finish or none can move."""

    def __init__(
        self, schedule: list[list[Action]], forward_cost: float, backward_cost: float, weight_cost: float
    ) -> None:
        self.ranks = [_Rank(batches(actions)) for actions in schedule]
        split = any(a.kind is Kind.W for actions in schedule for a in actions)
        b = backward_cost if split else backward_cost + weight_cost
        self.cost = {Kind.F: forward_cost, Kind.B: b, Kind.W: weight_cost}
        self.eager_sends = split
        self.last_chunk = max((a.chunk for actions in schedule for a in actions), default=0)
        # The rank that runs each chunk's forwards: neighbouring chunks on one rank need no transfer.
        self.owner = {a.chunk: r for r, actions in enumerate(schedule) for a in actions if a.kind is Kind.F}
        # FIFO queues per channel (src, dst), or (src, dst, kind) when the two kinds have their own tags:
        # [payload, post time, matched partner's post time or None]
        self.sends: dict[tuple, list[list]] = defaultdict(list)
        self.recvs: dict[tuple, list[list]] = defaultdict(list)
        # How many pairs at the head of each channel's two queues are matched (always a prefix).
        self.matched: dict[tuple, int] = defaultdict(int)

    def run(self) -> SimResult:
        progress = True
        while progress:
            progress = False
            for r in range(len(self.ranks)):
                progress |= self._advance(r)
        self._check_finished()
        busy = [sum(self.cost[a.kind] for _, a in rank.starts) for rank in self.ranks]
        return SimResult(
            makespan=max(rank.clock for rank in self.ranks),
            ideal=max(busy),
            peak_in_flight=[rank.peak for rank in self.ranks],
            starts=[rank.starts for rank in self.ranks],
        )

    def _advance(self, r: int) -> bool:
        """Run rank r until it finishes or waits for a peer; whether it moved."""
        rank, moved = self.ranks[r], False
        while not rank.done:
            group = rank.groups[rank.position]
            if group[0].kind in COMPUTE:
                self._compute(r, group[0])
            else:
                if rank.open_batch is None:
                    self._post(r, group)
                    moved = True
                if not self._complete(r, group):
                    return moved  # waiting for a peer
            rank.position += 1
            moved = True
        return moved

    def _compute(self, r: int, a: Action) -> None:
        """A forward or backward, after checking that its inputs have arrived."""
        rank, key = self.ranks[r], (a.chunk, a.microbatch)
        if a.kind is Kind.F:
            if a.chunk > 0 and not self._has_input(r, a):
                raise ScheduleError(f"rank {r} runs {a} before receiving its input")
            rank.forwarded.add(key)
            rank.in_flight += 1
            rank.peak = max(rank.peak, rank.in_flight)
        elif a.kind is Kind.B:
            if key not in rank.forwarded:
                raise ScheduleError(f"rank {r} runs {a} before its forward")
            if a.chunk < self.last_chunk and not self._has_output_grad(r, a):
                raise ScheduleError(f"rank {r} runs {a} before receiving its output gradient")
            rank.in_flight -= 1
            rank.backwarded.add(key)
        else:
            if key not in rank.backwarded or key in rank.weighted:
                raise ScheduleError(f"rank {r} runs {a} before its B, or twice")
            rank.weighted.add(key)
        rank.starts.append((rank.clock, a))
        rank.clock += self.cost[a.kind]

    def _has_input(self, r: int, a: Action) -> bool:
        if self.owner.get(a.chunk - 1) == r:
            return (a.chunk - 1, a.microbatch) in self.ranks[r].forwarded
        return ("activation", a.chunk - 1, a.microbatch) in self.ranks[r].received

    def _has_output_grad(self, r: int, a: Action) -> bool:
        if self.owner.get(a.chunk + 1) == r:
            return (a.chunk + 1, a.microbatch) in self.ranks[r].backwarded
        return ("gradient", a.chunk + 1, a.microbatch) in self.ranks[r].received

    def _post(self, r: int, group: list[Action]) -> None:
        """Post a whole batch of transfers at the rank's clock and match what its peers posted."""
        rank = self.ranks[r]
        for a in group:
            if _is_send(a) and (a.chunk, a.microbatch) not in (
                rank.forwarded if a.kind is Kind.SEND_F else rank.backwarded
            ):
                raise ScheduleError(f"rank {r} sends {a} before computing it")
        rank.open_batch = []
        for a in group:
            assert a.peer is not None  # every transfer names its peer
            entry = [_payload(a), rank.clock, None]
            (self.sends if _is_send(a) else self.recvs)[self._channel(r, a)].append(entry)
            if not (_is_send(a) and self.eager_sends):  # an eager send is not waited for
                rank.open_batch.append(entry)
        for a in group:
            self._match(self._channel(r, a))

    def _channel(self, r: int, a: Action) -> tuple:
        assert a.peer is not None  # every transfer names its peer
        src, dst = (r, a.peer) if _is_send(a) else (a.peer, r)
        if not self.eager_sends:
            return (src, dst)
        return (src, dst, "gradient" if a.kind in (Kind.SEND_B, Kind.RECV_B) else "activation")

    def _match(self, channel: tuple) -> None:
        """Pair the k-th send on a channel (from src to dst) with the k-th receive on it. Pairs are
        matched in order, so only those past the matched prefix are new."""
        src, dst = channel[:2]
        sends, recvs = self.sends[channel], self.recvs[channel]
        both = min(len(sends), len(recvs))
        for k in range(self.matched[channel], both):
            s, rv = sends[k], recvs[k]
            if s[0] != rv[0]:
                raise ScheduleError(
                    f"rank {dst} expects {rv[0]} from rank {src} but the next message sent is {s[0]}"
                )
            s[2], rv[2] = rv[1], s[1]
        self.matched[channel] = both

    def _complete(self, r: int, group: list[Action]) -> bool:
        """Finish the rank's open batch if every transfer in it has met its partner."""
        rank = self.ranks[r]
        assert rank.open_batch is not None
        if any(e[2] is None for e in rank.open_batch):
            return False
        rank.clock = max([rank.clock, *(e[2] for e in rank.open_batch)])
        rank.received |= {_payload(a) for a in group if a.kind in (Kind.RECV_F, Kind.RECV_B)}
        rank.open_batch = None
        return True

    def _check_finished(self) -> None:
        """Every rank ran its whole list, and every send met a receive."""
        stuck = [r for r, rank in enumerate(self.ranks) if not rank.done]
        if stuck:
            waits = "; ".join(
                f"rank {r} waits in [{' '.join(map(str, self.ranks[r].groups[self.ranks[r].position]))}]"
                for r in stuck
            )
            raise ScheduleError(f"deadlock: {waits}")
        for r, rank in enumerate(self.ranks):
            if rank.weighted and rank.weighted != rank.backwarded:
                missing = sorted(rank.backwarded - rank.weighted)
                raise ScheduleError(f"rank {r} never runs W for (chunk, micro-batch) {missing}")
        for channel, queue in self.sends.items():
            if len(queue) != len(self.recvs[channel]):
                raise ScheduleError(
                    f"{len(queue)} sends from rank {channel[0]} to {channel[1]} but "
                    f"{len(self.recvs[channel])} receives"
                )


def simulate(
    schedule: list[list[Action]],
    *,
    forward_cost: float = 1.0,
    backward_cost: float = 1.0,
    weight_cost: float = 0.0,
) -> SimResult:
    """Run all ranks' lists; raises ScheduleError naming each stuck rank's next action on a deadlock.

    backward_cost is the input-gradient part B, weight_cost the weight-gradient part W (see the module's
    docstring); the default weight_cost 0 makes backward_cost the whole backward."""
    return _Simulator(schedule, forward_cost, backward_cost, weight_cost).run()


@functools.cache
def simulate_named(name: str, pp_size: int, num_model_chunks: int, num_microbatches: int) -> SimResult:
    """The named schedule's action lists simulated with F = B = W = 1 (a linear layer's three GEMMs),
    cached: the planner's search asks for the same few again and again, for the bubble (time model) and
    for the micro-batches in flight (memory model). Each rank's peak in flight depends on its order of
    actions alone, not on the costs. Shared and cached: read it, do not change it."""
    schedule = build_schedule(name, pp_size, num_model_chunks, num_microbatches)
    return simulate(schedule, forward_cost=1.0, backward_cost=1.0, weight_cost=1.0)


def timeline(result: SimResult) -> str:
    """A step x rank grid of compute actions (F<chunk>.<micro-batch>); '.' is an idle slot."""
    times = sorted({t for rank in result.starts for t, _ in rank})
    cells = [{t: str(a) for t, a in rank} for rank in result.starts]
    width = max([len(c) for rank in cells for c in rank.values()] + [6])
    header = "step  " + " ".join(f"rank {r}".ljust(width) for r in range(len(cells)))
    rows = [header]
    for i, t in enumerate(times):
        rows.append(f"{i:<5} " + " ".join(rank.get(t, ".").ljust(width) for rank in cells))
    return "\n".join(rows)
