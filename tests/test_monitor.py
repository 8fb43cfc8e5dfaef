"""metrics.jsonl across resumes: the steps after the checkpoint are logged once, not twice."""

import json
from types import SimpleNamespace

import torch

from threefold.config import build_config
from threefold.monitor import drop_records_after
from threefold.report import Reporter


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_drop_records_after_keeps_earlier_steps_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "train/loss": 5.0 - s} for s in range(1, 6)] + [{"step": 4, "val/loss": 1.0}]
    _write(path, records, tail='{"step": 6, "train/lo')
    assert drop_records_after(path, 3) == 4
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    assert drop_records_after(path, 3) == 0
    assert drop_records_after(tmp_path / "missing.jsonl", 3) == 0


def _reporter(tmp_path, start_step):
    config = build_config(
        {"logging": dict(out_dir=str(tmp_path), progress=False, tensorboard=False, plot=False)},
        check_paths=False,
    )
    mesh = SimpleNamespace(world_size=1, rank=0)
    return Reporter(config, mesh, torch.device("cpu"), enabled=True, start_step=start_step)  # type: ignore[arg-type]


def test_a_resumed_run_does_not_log_the_rerun_steps_twice(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": s, "train/loss": 1.0} for s in range(1, 5)])
    reporter = _reporter(tmp_path, start_step=2)  # resumed from the checkpoint of step 2
    reporter.writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    _reporter(tmp_path, start_step=0).writer.close()  # a fresh run starts a fresh file
    assert path.read_text() == ""
