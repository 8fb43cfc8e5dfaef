"""An error every worker meets alike is printed once, not once per rank; a local run checks its data first.

The launcher checks the dataset (and the GPUs) before any worker starts; an error found later, by the
workers, is printed by the first of them to report it (reliability.supervisor.report_once), and the
launcher lets the others leave on their own instead of naming the first one that exits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import run_ranks
from tiny import tiny_config, write_toml

from threefold.reliability import supervisor
from threefold.reliability.supervisor import LauncherSignals, ProgressNote, report_once, supervise


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "threefold", "train", str(config), "--nproc", "2"],
                          capture_output=True, text=True, timeout=150, env=_env())  # fmt: skip


def _write_config(tmp_path: Path, data: Path, **checkpoint) -> Path:
    config = tiny_config(data, tmp_path / "run", dp=2, training=dict(max_steps=2, global_batch_size=4),
                         logging=dict(out_dir=str(tmp_path / "run")), checkpoint=checkpoint)  # fmt: skip
    return write_toml(tmp_path / "run.toml", config)


def _corrupt_copy(dataset: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    tokens = np.fromfile(data / "val.bin", dtype=np.uint16)
    tokens[5] = 65000
    tokens.tofile(data / "val.bin")
    return data


@pytest.mark.timeout(160)
def test_bad_data_is_reported_once_before_any_worker_starts(sonnets_dataset, tmp_path):
    proc = _train(_write_config(tmp_path, _corrupt_copy(sonnets_dataset, tmp_path)))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert output.count("is corrupt: token 5 has id 65000") == 1, output
    assert proc.stderr.startswith("threefold: error: ") and "Traceback" not in output, output
    assert not (tmp_path / "run" / "events.jsonl").exists(), "a worker started (it logs its layout)"


@pytest.mark.timeout(160)
def test_under_torchrun_the_workers_check_the_data_and_one_reports_it(sonnets_dataset, tmp_path):
    data = _corrupt_copy(sonnets_dataset, tmp_path)
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "threefold", "train",
           str(_write_config(tmp_path, data))]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=_env())
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exitcode  : 2" in output, output  # torchrun's own summary
    assert output.count("is corrupt: token 5 has id 65000") == 1, output


@pytest.mark.timeout(160)
def test_a_checkpoint_every_worker_fails_to_load_is_reported_once(sonnets_dataset, tmp_path):
    """Found by the workers (the launcher only sees that the manifest is there): every rank raises the
    same error, and one prints it."""
    from threefold.checkpoint import save_checkpoint
    from threefold.parallel.mesh import build_mesh
    from threefold.train import build

    step = tmp_path / "saved" / "step_0"
    saved = tiny_config(sonnets_dataset, tmp_path / "saved")

    def save(rank: int, world: int) -> None:
        save_checkpoint(build(saved, build_mesh(1, 1, 1), torch.device("cpu")), step.parent, step=0,
                        consumed_samples=0, keep_last=1)  # fmt: skip

    run_ranks(1, save)
    with open(step / "rank00000.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")  # the manifest's checksum no longer matches
    proc = _train(_write_config(tmp_path, sonnets_dataset, load=str(step)))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert output.count("does not match its checksum") == 1, output
    assert "threefold: error: checkpoint.load: checkpoint file" in proc.stderr, output
    assert "Traceback" not in output and "exited with status" not in output, output


def _report(rank: int, world: int, texts: list[str]) -> None:
    report_once(texts[rank], 2)


def test_report_once_prints_a_text_once_per_run(capfd):
    run_ranks(3, _report, ["threefold: error: same", "threefold: error: same", "threefold: error: other"])
    err = capfd.readouterr().err
    assert err.count("threefold: error: same") == 1 and err.count("threefold: error: other") == 1, err


def _worker(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import sys, time\n{code}"])


def test_launcher_lets_the_reporting_worker_print_and_adds_nothing(capfd):
    """Rank 1 leaves first, quietly (its text was already counted); rank 0, slower, prints and leaves."""
    signals = LauncherSignals()
    signals.procs += [_worker("time.sleep(1); print('threefold: error: the reason', file=sys.stderr); "
                              "sys.exit(2)"), _worker("sys.exit(2)")]  # fmt: skip
    assert supervise(signals, ProgressNote(None)) == 2
    err = capfd.readouterr().err
    assert err.count("threefold: error: the reason") == 1 and "exited with status" not in err, err


def test_launcher_stops_a_worker_that_does_not_follow(capfd, monkeypatch):
    """A rank-local error: the others wait in a collective forever; after the grace they are stopped."""
    monkeypatch.setattr(supervisor, "REPORT_GRACE", 1.0)
    signals = LauncherSignals()
    signals.procs += [_worker("time.sleep(60)"), _worker("sys.exit(2)")]
    assert supervise(signals, ProgressNote(None)) == 2
    assert signals.procs[0].poll() is not None
    assert "threefold: rank 1 exited with status 2; stopping the other 1 rank" in capfd.readouterr().err
