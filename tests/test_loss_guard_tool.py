"""bench/fp8_loss_plot.py's summary over seeds (the multi-seed FP8 loss guard of issue 18), on small
metrics.jsonl files written here."""

import importlib.util
import json
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "fp8_loss_plot", Path(__file__).parents[1] / "bench/fp8_loss_plot.py"
)
assert SPEC is not None and SPEC.loader is not None
plot = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(plot)


def _run(path: Path, losses: list[float]) -> None:
    lines = [
        json.dumps({"step": i + 1, "train/loss": loss, "train/lr": 1e-3}) for i, loss in enumerate(losses)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_the_seed_summary_compares_mean_curves_and_measures_bf16s_spread(tmp_path):
    # two seeds; the last 4 steps are what a 4-step window sees
    _run(tmp_path / "false.jsonl", [5.0] * 6 + [2.0] * 4)
    _run(tmp_path / "tensorwise.jsonl", [9.0] * 6 + [2.02] * 4)
    _run(tmp_path / "false-seed7.jsonl", [5.0] * 6 + [2.02] * 4)
    _run(tmp_path / "tensorwise-seed7.jsonl", [1.0] * 6 + [2.04] * 4)
    _run(tmp_path / "false-seed8.jsonl", [5.0] * 10)  # no fp8 partner: left out
    assert set(plot.seed_pairs(tmp_path)) == {"base", "seed7"}
    got = plot.seed_summary(tmp_path, window=4, start=1)
    assert got["seeds"] == 2
    assert got["gap"] == pytest.approx(2.03 / 2.01 - 1)
    assert got["bf16_spread"] == pytest.approx(0.01 / 2.01)
    assert got["pair_gaps_max"] == pytest.approx(0.01)
    # the first 6 steps: fp8's mean curve (9 + 1) / 2 = 5 is bf16's, so the largest gap is the last ones'
    assert got["largest_gap"] == pytest.approx(2.03 / 2.01 - 1)
    assert got["largest_gap_step"] == 10
    assert got["within"] == 1.0


def test_the_largest_gap_is_found_after_the_start_step_and_per_recipe(tmp_path):
    bf16 = [3.0] * 10
    _run(tmp_path / "false-seed1.jsonl", bf16)
    _run(tmp_path / "tensorwise-seed1.jsonl", [3.0] * 4 + [3.3] + [3.0] * 5)  # +10% at step 5 only
    _run(tmp_path / "rowwise-seed1.jsonl", [3.6] + [3.0] * 9)  # +20% at step 1, before the start
    assert set(plot.seed_pairs(tmp_path, "rowwise")) == {"seed1"}
    tensorwise = plot.seed_summary(tmp_path, window=1, start=2)
    assert tensorwise["largest_gap"] == pytest.approx(0.1) and tensorwise["largest_gap_step"] == 5
    assert tensorwise["within"] == pytest.approx(8 / 9)
    rowwise = plot.seed_summary(tmp_path, window=1, start=2, fp8="rowwise")
    assert rowwise["largest_gap"] == pytest.approx(0, abs=1e-12) and rowwise["within"] == 1.0


def test_the_command_exits_2_where_a_mean_curve_leaves_one_percent_and_plots(tmp_path, monkeypatch):
    _run(tmp_path / "false-seed1.jsonl", [3.0] * 10)
    _run(tmp_path / "tensorwise-seed1.jsonl", [3.0] * 5 + [3.06] * 5)  # +2%
    _run(tmp_path / "rowwise-seed1.jsonl", [3.0] * 5 + [3.015] * 5)  # +0.5%
    svg = tmp_path / "seeds.svg"
    argv = ["fp8_loss_plot.py", str(tmp_path), "--seeds", "--window", "1", "--from", "1", "--svg", str(svg)]
    monkeypatch.setattr("sys.argv", [*argv, "--fp8", "rowwise"])
    assert plot.main() == 0
    assert svg.read_text(encoding="utf-8").lstrip().startswith("<?xml")
    monkeypatch.setattr("sys.argv", [*argv, "--fp8", "tensorwise", "rowwise"])
    assert plot.main() == 2


def test_the_seed_summary_names_a_directory_without_runs(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        plot.seed_summary(tmp_path, window=4)
