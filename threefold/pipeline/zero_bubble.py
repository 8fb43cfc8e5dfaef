"""Zero-bubble schedules (Qi et al., 2023): ZB-H1 and ZB-V, built by list scheduling.

The backward is split into B (the input gradient, which the previous chunk waits for) and W (the weight
gradient, which nobody waits for). Only B lies on the critical path back through the pipeline, so the
cool-down's gradients come back faster, and the Ws fill the time a rank would otherwise wait.

Both schedules come from one greedy list scheduler that plays all ranks forward in time with unit costs
(F = B = W): whenever a rank is free it runs, in this order of preference,
  1. a B whose output gradient has arrived (it is on the critical path and frees activations),
  2. an F whose input has arrived, if the rank has fewer than its limit of forwards awaiting their B,
  3. the oldest W it owes,
and otherwise waits for the next arrival. The limits are 1F1B's activation memory:
  ZB-H1 (one chunk per rank): rank r holds at most pp_size - r micro-batches, exactly as in 1F1B;
  ZB-V (two chunks per rank, placed in a V: rank r holds chunks r and 2 pp_size - 1 - r, each half a
  stage): every rank holds at most 2 pp_size chunk micro-batches, 1F1B's peak of pp_size whole stages.
In the V, a micro-batch's last forward and first backward run on rank 0 and its turn (chunk p-1 to p) on
the last rank without a transfer, which is what lets its bubble approach zero.
"""

from __future__ import annotations

import functools

from threefold.pipeline.partition import chunks_of_rank, rank_of_chunk
from threefold.pipeline.schedules import Action, B, F, Kind, Step, W


@functools.cache
def _plan(
    pp_size: int, num_model_chunks: int, num_microbatches: int, v_shape: bool
) -> tuple[tuple[Action, ...], ...]:
    """Every rank's compute actions in order (see the module docstring)."""
    p, v, m = pp_size, num_model_chunks, num_microbatches
    last = p * v - 1
    local = [chunks_of_rank(r, p, v, v_shape) for r in range(p)]
    limit = [2 * p] * p if v_shape else [p - r for r in range(p)]
    clock = [0.0] * p
    inputs_at: dict[tuple[int, int], float] = {(0, mb): 0.0 for mb in range(m)}
    """When each (chunk, micro-batch)'s input is on its rank; `grads_at` the same for output gradients."""
    grads_at: dict[tuple[int, int], float] = {}
    next_f = [dict.fromkeys(chunks, 0) for chunks in local]  # next micro-batch to forward, per chunk
    next_b = [dict.fromkeys(chunks, 0) for chunks in local]
    owed_w: list[list[tuple[int, int]]] = [[] for _ in range(p)]
    in_flight = [0] * p
    order: list[list[Action]] = [[] for _ in range(p)]
    remaining = [3 * v * m] * p

    def owner(c: int) -> int:
        return rank_of_chunk(c, p, v_shape)

    def choose(r: int, t: float) -> Action | None:
        # Later chunks first: they finish a micro-batch (or start its way back) sooner.
        for c in sorted(local[r], reverse=True):
            mb = next_b[r][c]
            if mb < next_f[r][c] and grads_at.get((c, mb), float("inf")) <= t:
                return B(c, mb)
        forwards = [
            F(c, next_f[r][c])
            for c in sorted(local[r], reverse=True)
            if next_f[r][c] < m and inputs_at.get((c, next_f[r][c]), float("inf")) <= t
        ]
        if forwards and in_flight[r] < limit[r]:
            return forwards[0]
        return W(*owed_w[r][0]) if owed_w[r] else None

    def next_arrival(r: int, t: float) -> float:
        times = [inputs_at.get((c, next_f[r][c]), float("inf")) for c in local[r] if next_f[r][c] < m]
        times += [grads_at.get((c, next_b[r][c]), float("inf")) for c in local[r] if next_b[r][c] < m]
        times += [clock[q] for q in range(p) if remaining[q] and clock[q] > t]
        later = [x for x in times if x > t]
        assert later, "the greedy scheduler cannot stall: some rank always holds work"
        return min(later)

    while any(remaining):
        t = min(clock[r] for r in range(p) if remaining[r])
        waiting = [r for r in range(p) if remaining[r] and clock[r] == t]
        ran = False
        for r in waiting:
            a = choose(r, t)
            if a is None:
                continue
            ran = True
            key = (a.chunk, a.microbatch)
            order[r].append(a)
            remaining[r] -= 1
            end = clock[r] = t + 1.0
            if a.kind is Kind.F:
                next_f[r][a.chunk] += 1
                in_flight[r] += 1
                if a.chunk == last:
                    grads_at[key] = end
                else:
                    inputs_at[(a.chunk + 1, a.microbatch)] = end
            elif a.kind is Kind.B:
                next_b[r][a.chunk] += 1
                in_flight[r] -= 1
                owed_w[r].append(key)
                if a.chunk > 0:
                    grads_at[(a.chunk - 1, a.microbatch)] = end
            else:
                owed_w[r].pop(0)
        if not ran:
            for r in waiting:
                clock[r] = next_arrival(r, t)
    assert all(rank_of_chunk(a.chunk, p, v_shape) == r for r in range(p) for a in order[r])
    return tuple(tuple(actions) for actions in order)


def zb_h1(rank: int, pp_size: int, num_model_chunks: int, num_microbatches: int) -> list[Step]:
    """ZB-H1: 1F1B's memory (pp_size - rank micro-batches in flight), the Ws filling the cool-down."""
    assert num_model_chunks == 1
    return [[a] for a in _plan(pp_size, 1, num_microbatches, False)[rank]]


def zb_v(rank: int, pp_size: int, num_model_chunks: int, num_microbatches: int) -> list[Step]:
    """ZB-V: two chunks per rank in a V, at 1F1B's peak activation memory."""
    assert num_model_chunks == 2
    return [[a] for a in _plan(pp_size, 2, num_microbatches, True)[rank]]
