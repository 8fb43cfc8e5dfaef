"""`threefold train` end to end: real worker processes, metrics, plot, TensorBoard, and Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import defaults, tiny_config, write_toml

from threefold.config import OptimizerConfig


@pytest.fixture(scope="module")
def dataset(sonnets_dataset) -> Path:
    return sonnets_dataset


def _write_config(tmp_path: Path, dataset: Path, max_steps: int) -> Path:
    config = tiny_config(
        dataset, tmp_path / "run", tp=2, model=dict(preset="tiny", num_layers=2), data=dict(seq_len=32),
        optimizer=defaults(OptimizerConfig),
        training=dict(max_steps=max_steps, global_batch_size=4, eval_interval=3, eval_sequences=4),
        logging=dict(out_dir=str(tmp_path / "run"), progress=True, tensorboard=True, plot=True),
    )  # fmt: skip
    return write_toml(tmp_path / "run.toml", config)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(180)
def test_train_command_writes_metrics_plot_and_events(tmp_path, dataset):
    config = _write_config(tmp_path, dataset, max_steps=6)
    proc = subprocess.run(
        [sys.executable, "-m", "threefold", "train", str(config), "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=170,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "run"
    rows = _rows(run)
    train_rows = [r for r in rows if "train/loss" in r]
    val_rows = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in val_rows] == [0, 3, 6]
    assert val_rows[-1]["val/loss"] < val_rows[0]["val/loss"]
    assert all("perf/tokens_per_s_per_device" in r and "train/grad_norm" in r for r in train_rows[1:])
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "tb").glob("*/events.out.tfevents.*"))
    assert json.loads((run / "config.json").read_text())["parallel"]["tp_size"] == 2
    assert "done: 6 steps" in proc.stdout
    assert "tokens/s/device over the last 5 steps" in proc.stdout  # the median after step 1 (a short run)


@pytest.mark.timeout(180)
def test_ctrl_c_stops_all_workers_cleanly(tmp_path, dataset):
    config = _write_config(tmp_path, dataset, max_steps=100_000)
    # A terminal's Ctrl-C reaches the whole foreground process group: launcher and workers alike.
    proc = subprocess.Popen(
        [sys.executable, "-m", "threefold", "train", str(config), "--nproc", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    try:
        deadline = time.time() + 150
        while len([r for r in _rows(tmp_path / "run") if "train/loss" in r]) < 2:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "training never started"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped after step" in output and "interrupted" in output, output
    assert "Traceback" not in output, output
    run = tmp_path / "run"
    assert (run / "loss.png").exists(), "the plot is still written after an interrupt"
    rows = _rows(run)
    last_train = max(r["step"] for r in rows if "train/loss" in r)
    assert any(r["step"] == last_train and "val/loss" in r for r in rows), "final validation at the stop step"
