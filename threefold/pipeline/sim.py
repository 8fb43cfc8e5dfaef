"""Play every rank's action list without processes: deadlocks, message order, bubble, memory.

Model of execution (the executor's, and NCCL's): a rank runs its actions in order. A batch of transfers
is posted all at once and completes when every transfer in it has met its partner, a send meeting the
receive posted by the peer; transfers between two ranks meet in FIFO order (the k-th send from a to b
meets the k-th receive on b from a), so the simulator also proves that each receive gets the tensor it
expects. Transfers take no time; forwards and backwards take the given costs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from threefold.pipeline.schedules import COMPUTE, Action, Kind, batches


class ScheduleError(RuntimeError):
    """The action lists cannot run: a deadlock, a mismatched transfer, or a missing dependency."""


@dataclass
class SimResult:
    makespan: float
    ideal: float
    """Busy time of one rank: its forwards and backwards back to back."""
    peak_in_flight: list[int]
    """Per rank, the most (chunk, micro-batch) forwards whose backward had not yet run."""
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


def simulate(
    schedule: list[list[Action]], *, forward_cost: float = 1.0, backward_cost: float = 1.0
) -> SimResult:
    """Run all ranks' lists; raises ScheduleError naming each stuck rank's next action on a deadlock."""
    num_ranks = len(schedule)
    groups = [batches(actions) for actions in schedule]
    position = [0] * num_ranks
    clock = [0.0] * num_ranks
    posted_at: list[float | None] = [None] * num_ranks
    # FIFO queues per (src, dst): [payload, post time, matched partner post time or None]
    sends: dict[tuple[int, int], list[list]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[list]] = defaultdict(list)
    entries: list[list[list]] = [[] for _ in range(num_ranks)]  # the queue entries of each rank's open batch
    received: list[set] = [set() for _ in range(num_ranks)]
    forwarded: list[set] = [set() for _ in range(num_ranks)]
    computed_f: list[set] = [set() for _ in range(num_ranks)]
    computed_b: list[set] = [set() for _ in range(num_ranks)]
    in_flight = [0] * num_ranks
    peak = [0] * num_ranks
    starts: list[list[tuple[float, Action]]] = [[] for _ in range(num_ranks)]
    last_chunk = max((a.chunk for actions in schedule for a in actions), default=0)

    def match(src: int, dst: int) -> None:
        s_queue, r_queue = sends[(src, dst)], recvs[(src, dst)]
        for s, r in zip(s_queue, r_queue, strict=False):
            if s[2] is None:
                if s[0] != r[0]:
                    raise ScheduleError(
                        f"rank {dst} expects {r[0]} from rank {src} but the next message sent is {s[0]}"
                    )
                s[2], r[2] = r[1], s[1]

    def run_compute(rank: int, a: Action) -> None:
        key = (a.chunk, a.microbatch)
        if a.kind is Kind.F:
            if a.chunk > 0 and ("activation", a.chunk - 1, a.microbatch) not in received[rank]:
                raise ScheduleError(f"rank {rank} runs {a} before receiving its input")
            forwarded[rank].add(key)
            computed_f[rank].add(key)
            in_flight[rank] += 1
            peak[rank] = max(peak[rank], in_flight[rank])
            cost = forward_cost
        else:
            if key not in forwarded[rank]:
                raise ScheduleError(f"rank {rank} runs {a} before its forward")
            if a.chunk < last_chunk and ("gradient", a.chunk + 1, a.microbatch) not in received[rank]:
                raise ScheduleError(f"rank {rank} runs {a} before receiving its output gradient")
            in_flight[rank] -= 1
            computed_b[rank].add(key)
            cost = backward_cost
        starts[rank].append((clock[rank], a))
        clock[rank] += cost

    progress = True
    while progress:
        progress = False
        for rank in range(num_ranks):
            while position[rank] < len(groups[rank]):
                group = groups[rank][position[rank]]
                if group[0].kind in COMPUTE:
                    run_compute(rank, group[0])
                    position[rank] += 1
                    progress = True
                    continue
                if posted_at[rank] is None:  # post the whole batch
                    posted_at[rank] = clock[rank]
                    for a in group:
                        if a.kind in (Kind.SEND_F, Kind.SEND_B) and (a.chunk, a.microbatch) not in (
                            computed_f[rank] if a.kind is Kind.SEND_F else computed_b[rank]
                        ):
                            raise ScheduleError(f"rank {rank} sends {a} before computing it")
                    for a in group:
                        assert a.peer is not None  # every transfer names its peer
                        entry = [_payload(a), clock[rank], None]
                        queue = (
                            sends[(rank, a.peer)]
                            if a.kind in (Kind.SEND_F, Kind.SEND_B)
                            else recvs[(a.peer, rank)]
                        )
                        queue.append(entry)
                        entries[rank].append(entry)
                    for a in group:
                        match(*((rank, a.peer) if a.kind in (Kind.SEND_F, Kind.SEND_B) else (a.peer, rank)))
                    progress = True
                if any(e[2] is None for e in entries[rank]):
                    break  # waiting for a peer
                clock[rank] = max([clock[rank], *(e[2] for e in entries[rank])])
                for a in group:
                    if a.kind in (Kind.RECV_F, Kind.RECV_B):
                        received[rank].add(_payload(a))
                entries[rank] = []
                posted_at[rank] = None
                position[rank] += 1
                progress = True

    stuck = [r for r in range(num_ranks) if position[r] < len(groups[r])]
    if stuck:
        waits = "; ".join(f"rank {r} waits in [{' '.join(map(str, groups[r][position[r]]))}]" for r in stuck)
        raise ScheduleError(f"deadlock: {waits}")
    for (src, dst), queue in sends.items():
        if len(queue) != len(recvs[(src, dst)]):
            raise ScheduleError(
                f"{len(queue)} sends from rank {src} to {dst} but {len(recvs[(src, dst)])} receives"
            )
    busy = [sum(forward_cost if a.kind is Kind.F else backward_cost for _, a in s) for s in starts]
    return SimResult(makespan=max(clock), ideal=max(busy), peak_in_flight=peak, starts=starts)


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
