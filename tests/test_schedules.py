"""Pipeline schedules, checked by the simulator without processes."""

import pytest

from threefold.pipeline.schedules import (
    COMPUTE,
    Action,
    B,
    F,
    Kind,
    add_communication,
    build_schedule,
    check_schedule_args,
)
from threefold.pipeline.sim import ScheduleError, simulate, simulate_named, timeline


def _cases():
    for name in ("gpipe", "1f1b", "interleaved"):
        for pp in range(1, 9):
            for v in range(1, 5):
                if v > 1 and (name == "1f1b" or pp == 1):
                    continue
                for m in sorted({1, 2, 3, pp, pp + 1, 2 * pp, 3 * pp}):
                    if v > 1 and m % pp:
                        continue  # the interleaved order needs whole groups of pp micro-batches
                    yield name, pp, v, m


CASES = list(_cases())


@pytest.mark.parametrize("name,pp,v,m", CASES, ids=[f"{n}-p{p}-v{v}-m{m}" for n, p, v, m in CASES])
def test_schedule_runs_and_has_the_papers_bubble(name, pp, v, m):
    schedule = build_schedule(name, pp, v, m)
    for forward_cost, backward_cost in ((1.0, 1.0), (1.0, 2.0)):
        result = simulate(schedule, forward_cost=forward_cost, backward_cost=backward_cost)  # no deadlock
        assert result.bubble_fraction == pytest.approx((pp - 1) / (v * m), abs=1e-12)
    for rank, actions in enumerate(schedule):
        compute = [a for a in actions if a.kind in COMPUTE]
        expected = {(rank + k * pp, mb) for k in range(v) for mb in range(m)}
        forwards = [(a.chunk, a.microbatch) for a in compute if a.kind is Kind.F]
        backwards = [(a.chunk, a.microbatch) for a in compute if a.kind is Kind.B]
        assert sorted(forwards) == sorted(expected) and len(forwards) == len(expected)
        assert sorted(backwards) == sorted(expected) and len(backwards) == len(expected)
        for key in expected:  # every forward precedes its backward on this rank
            assert compute.index(F(*key)) < compute.index(B(*key)), (rank, key)
    # Transfers: one activation and one gradient per chunk boundary and micro-batch, in total.
    transfers = [a for actions in schedule for a in actions if a.kind not in COMPUTE]
    boundaries = (pp * v - 1) * m
    for kind in (Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B):
        assert sum(a.kind is kind for a in transfers) == boundaries


@pytest.mark.parametrize("pp,m", [(4, 8), (4, 2), (3, 7), (8, 8)])
def test_peak_activations_in_flight(pp, m):
    assert simulate(build_schedule("gpipe", pp, 1, m)).peak_in_flight == [m] * pp
    assert simulate(build_schedule("1f1b", pp, 1, m)).peak_in_flight == [min(pp - r, m) for r in range(pp)]


def test_interleaving_shrinks_the_bubble_by_v():
    base = simulate(build_schedule("1f1b", 4, 1, 8)).bubble_fraction
    for v in (2, 4):
        assert simulate(build_schedule("interleaved", 4, v, 8)).bubble_fraction == pytest.approx(base / v)


def test_simulator_catches_a_deadlock():
    # Two chunks per rank visited chunk by chunk: rank 0 keeps sending chunk 0's outputs while rank 1,
    # already done with chunk 1's first micro-batch, waits to hand it back to rank 0.
    steps = [
        [[F(r + 2 * k, mb)] for k in range(2) for mb in range(4)]
        + [[B(r + 2 * k, mb)] for k in (1, 0) for mb in range(4)]
        for r in range(2)
    ]
    schedule = [add_communication(steps[r], r, 2, 2) for r in range(2)]
    with pytest.raises(ScheduleError, match="deadlock: rank 0 waits"):
        simulate(schedule)


def test_simulator_catches_a_send_before_its_compute():
    schedule = [[Action(Kind.SEND_F, 0, 0, 1), Action(Kind.F, 0, 0)], [Action(Kind.RECV_F, 1, 0, 0)]]
    with pytest.raises(ScheduleError, match="sends SEND_F0.0@1 before computing it"):
        simulate(schedule)


def test_simulator_catches_messages_out_of_order():
    schedule = build_schedule("gpipe", 2, 1, 2)
    receiver = schedule[1]
    i, j = (k for k, a in enumerate(receiver) if a.kind is Kind.RECV_F)
    receiver[i], receiver[j] = receiver[j], receiver[i]
    with pytest.raises(ScheduleError, match="expects"):
        simulate(schedule)


def test_simulator_catches_backward_before_forward():
    schedule = [[Action(Kind.B, 0, 0), Action(Kind.F, 0, 0)]]
    with pytest.raises(ScheduleError, match="before its forward"):
        simulate(schedule)


def test_timeline_prints_every_compute_action():
    result = simulate(build_schedule("1f1b", 2, 1, 2))
    text = timeline(result)
    assert text.splitlines()[0].split() == ["step", "rank", "0", "rank", "1"]
    for label in ("F0.0", "F0.1", "B0.0", "B0.1", "F1.0", "F1.1", "B1.0", "B1.1"):
        assert label in text


@pytest.mark.parametrize(
    "args,match",
    [
        (("zigzag", 2, 1, 4), "unknown pipeline schedule 'zigzag'"),
        (("1f1b", 4, 2, 8), r"1f1b schedule runs one model chunk per rank \(num_model_chunks = 2\)"),
        (("interleaved", 4, 2, 6), r"num_microbatches \(6\) to be a multiple of pp_size \(4\)"),
        (("gpipe", 1, 2, 4), r"num_model_chunks \(2\) > 1 needs pp_size > 1"),
        (("gpipe", 2, 1, 0), r"num_microbatches must be positive, got 0"),
    ],
)
def test_bad_schedule_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        check_schedule_args(*args)


# ---- balanced ends: the output layer and loss counted as layers ------------------------------------------


def test_ends_balance_without_end_costs_is_the_even_rule():
    from threefold.pipeline.partition import chunk_layer_ranges

    for layers in range(1, 20):
        for pp in range(1, 6):
            for v in range(1, 4):
                if pp * v <= layers:
                    even = chunk_layer_ranges(layers, pp, v)
                    assert chunk_layer_ranges(layers, pp, v, (0.0, 0.0)) == even
                    sizes = [b - a for a, b in even]
                    assert max(sizes) - min(sizes) <= 1


def test_ends_balance_minimises_the_costliest_chunk():
    from threefold.pipeline.partition import chunk_layer_ranges, end_layer_costs

    # llama-8b's shape: the head is ~2.1 layers of forward FLOPs at s = 4096.
    ends = end_layer_costs(
        "ends", per_layer_params=218_112_000, hidden_size=4096, vocab_size=128_256, seq_len=4096
    )
    assert ends[0] == 0.0 and 2.0 < ends[1] < 2.2
    assert end_layer_costs("layers", per_layer_params=1, hidden_size=1, vocab_size=1, seq_len=1) == (0.0, 0.0)
    sizes = [b - a for a, b in chunk_layer_ranges(32, 8, 1, ends)]
    assert sum(sizes) == 32 and sizes[-1] == 2
    cost = [s + (ends[1] if c == 7 else 0) for c, s in enumerate(sizes)]
    assert max(cost) == 5  # the even split's last stage costs 4 + 2.1


@pytest.mark.parametrize(("name", "v"), [("1f1b", 1), ("interleaved", 2), ("zb-h1", 1), ("zb-v", 2)])
def test_the_planners_shared_simulation_gives_the_peaks_of_any_costs(name, v):
    """simulate_named (F = B = W = 1, cached) serves both the planner's bubble and its memory: each rank's
    peak in flight is the same whatever the costs, so the memory model may read it from there."""
    p, m = 4, 8
    shared = simulate_named(name, p, v, m)
    assert simulate_named(name, p, v, m) is shared  # cached
    uneven = {"forward_cost": 3.0, "backward_cost": 1.0, "weight_cost": 0.5}
    for costs in ({}, {"backward_cost": 2.0}, uneven):
        assert simulate(build_schedule(name, p, v, m), **costs).peak_in_flight == shared.peak_in_flight, costs
    own = simulate(build_schedule(name, p, v, m), forward_cost=1.0, backward_cost=1.0, weight_cost=1.0)
    assert (shared.makespan, shared.ideal) == (own.makespan, own.ideal)
