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
    got = plot.seed_summary(tmp_path, window=4)
    assert got["seeds"] == 2
    assert got["gap"] == pytest.approx(2.03 / 2.01 - 1)
    assert got["bf16_spread"] == pytest.approx(0.01 / 2.01)
    assert got["pair_gaps_max"] == pytest.approx(0.01)


def test_the_seed_summary_names_a_directory_without_runs(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        plot.seed_summary(tmp_path, window=4)
