"""`threefold schedule` for the zero-bubble schedules: the printed figures are the simulator's."""

import re

import pytest

from threefold.cli import main
from threefold.pipeline.schedules import SCHEDULES, build_schedule
from threefold.pipeline.sim import simulate


def _bubble(out: str) -> float:
    return float(re.search(r"bubble fraction: ([0-9.]+) \(simulated\)", out).group(1))


@pytest.mark.parametrize(("name", "v"), [("1f1b", 1), ("interleaved", 2), ("zb-h1", 1), ("zb-v", 2)])
@pytest.mark.parametrize(("f", "b", "w"), [(1, 1, 1), (1, 1.5, 0.5)])
def test_printed_bubble_is_the_simulators(capsys, name, v, f, b, w):
    argv = [
        "schedule",
        "--schedule",
        name,
        "--pp",
        "4",
        "-m",
        "8",
        "--f",
        str(f),
        "--b",
        str(b),
        "--w",
        str(w),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = simulate(build_schedule(name, 4, v, 8), forward_cost=f, backward_cost=b, weight_cost=w)
    assert _bubble(out) == pytest.approx(result.bubble_fraction, abs=1e-4)
    assert f"makespan {result.makespan:g}" in out
    assert f"{name}: pp=4, v={v}, m=8" in out


def test_zero_bubble_timeline_shows_w_steps(capsys):
    assert main(["schedule", "--schedule", "zb-v", "--pp", "4", "-m", "8"]) == 0
    out = capsys.readouterr().out
    assert "F0.0" in out and "W7.7" in out and "B7.7" in out  # chunk 7 = 2p - 1: the V's last chunk
    assert "chunks c and 2p-1-c run on rank c" in out


def test_compare_prints_every_schedule_with_simulated_figures(capsys):
    assert main(["schedule", "--schedule", "zb-h1", "--pp", "4", "-m", "16", "--compare"]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in out.splitlines()
        if line.startswith("| ")
    }
    assert set(SCHEDULES) <= set(rows)
    for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1), ("zb-v", 2)):
        r = simulate(build_schedule(name, 4, v, 16), forward_cost=1, backward_cost=1, weight_cost=1)
        cells = [c.strip() for c in rows[name]]
        assert int(cells[0]) == v
        assert float(cells[1]) == pytest.approx(r.bubble_fraction, abs=1e-4)
        assert float(cells[2]) == pytest.approx(r.makespan / v)
        assert float(cells[3]) == pytest.approx(max(r.peak_in_flight) / v)
    bubbles = {n: float(rows[n][1]) for n in ("1f1b", "interleaved", "zb-h1", "zb-v")}
    assert bubbles["zb-v"] < bubbles["zb-h1"] < bubbles["interleaved"] < bubbles["1f1b"]


def test_compare_names_schedules_that_cannot_run(capsys):
    assert main(["schedule", "--pp", "4", "-m", "6", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "| interleaved | 2 | - | - | not possible:" in out and "multiple of pp_size (4)" in out


def test_chunks_is_an_alias_of_v_and_zb_v_needs_two(capsys):
    assert main(["schedule", "--schedule", "zb-v", "--chunks", "3", "--pp", "4", "-m", "8"]) == 2
    assert "exactly two model chunks per rank" in capsys.readouterr().err
