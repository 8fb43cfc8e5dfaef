"""Two torchrun agents on this machine as two "nodes" (c10d rendezvous, gloo, 2 ranks each).

tp=2 inside a node and pp=2 across: the TP groups must sit inside a node, the losses must match one
process training the same model, and a worker SIGKILLed on one node must restart both nodes' workers
and resume from the last checkpoint to exactly the uninterrupted run's losses and weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from distributed import run_ranks, train_and_gather
from safetensors.torch import load_file

from threefold.config import load_config
from threefold.reliability.events import read_events

STEPS = 6


def _write_config(path: Path, dataset: Path, run: Path, *, tp: int = 2, pp: int = 2) -> Path:
    # The float32 settings of tests/test_parity.py, so the same tolerance applies.
    path.write_text(
        f"""
[model]
arch = "llama"
vocab_size = 50257
hidden_size = 32
num_layers = 2
num_heads = 4
num_kv_heads = 2
ffn_hidden_size = 64
max_seq_len = 16

[parallel]
tp_size = {tp}
pp_size = {pp}

[data]
path = "{dataset}"
seq_len = 16

[optimizer]
lr = 2e-3
min_lr = 2e-4
warmup_steps = 2
grad_clip = 0.5
eps = 1e-6

[training]
max_steps = {STEPS}
global_batch_size = 8
micro_batch_size = 2
device = "cpu"
dtype = "float32"
seed = 7
eval_interval = 0

[logging]
out_dir = "{run}"
log_interval = 1
progress = false
tensorboard = false
plot = false

[checkpoint]
dir = "{run / "ckpt"}"
interval = 2
"""
    )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(config: Path, logs: Path, *, timeout: float = 150, **env: str) -> list[int]:
    """Run `threefold train config` under two torchrun agents; returns their exit codes."""
    endpoint, run_id = f"127.0.0.1:{_free_port()}", uuid.uuid4().hex[:8]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    agents = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
               "--rdzv-id", run_id, "--max-restarts", "1",
               "-m", "threefold.cli", "train", str(config)]  # fmt: skip
        with open(logs / f"node{node}.log", "w") as log:
            agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                           start_new_session=True))  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        for agent in agents:
            agent.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the two-node run did not finish in {timeout:.0f} s:\n{_logs(logs)}") from None
    finally:
        for agent in agents:  # their workers die with them (threefold.reliability.control.die_with_parent)
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    return [agent.returncode for agent in agents]


def _logs(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(logs.glob("node*.log")))


def _metrics(run: Path, key: str) -> dict[int, float]:
    """step -> the last logged value of `key` (a resumed run logs some steps twice)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            out[row["step"]] = row[key]
    return out


def _tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """Weights and optimizer state of a checkpoint, by file and name (as tests/test_reliability.py)."""
    out = {}
    for file in sorted(step_dir.glob("rank*.safetensors")):
        out |= {f"{file.name}:{k}": v for k, v in load_file(file).items() if not k.startswith("rng::")}
    return out


@pytest.fixture(scope="module")
def uninterrupted(sonnets_dataset, tmp_path_factory) -> Path:
    """The run directory of an uninterrupted two-node run."""
    root = tmp_path_factory.mktemp("two_nodes")
    config = _write_config(root / "run.toml", sonnets_dataset, root / "run")
    codes = _two_nodes(config, root)
    assert codes == [0, 0], _logs(root)
    return root / "run"


@pytest.mark.timeout(240)
def test_two_nodes_keep_tp_inside_a_node_and_match_one_process(uninterrupted, sonnets_dataset, tmp_path):
    (layout,) = [e for e in read_events(uninterrupted) if e["event"] == "layout"]
    assert sorted(layout["nodes"]) == [0, 0, 1, 1], layout
    assert sorted(layout["tp_groups"]) == [[0, 1], [2, 3]], layout
    for group in layout["tp_groups"]:
        assert len({layout["nodes"][r] for r in group}) == 1, f"TP group {group} spans nodes: {layout}"

    one = load_config(_write_config(tmp_path / "one.toml", sonnets_dataset, tmp_path / "one", tp=1, pp=1))
    ref = run_ranks(1, train_and_gather, one)[0]
    assert ref["losses"][-1] < ref["losses"][0], "training must make progress for the comparison to mean much"
    losses, norms = _metrics(uninterrupted, "train/loss"), _metrics(uninterrupted, "train/grad_norm")
    assert sorted(losses) == list(range(1, STEPS + 1))
    got = torch.tensor([losses[s] for s in sorted(losses)])
    torch.testing.assert_close(got, torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    got = torch.tensor([norms[s] for s in sorted(norms)])
    torch.testing.assert_close(got, torch.tensor(ref["norms"]), rtol=1e-5, atol=0)


@pytest.mark.timeout(240)
def test_a_worker_killed_on_one_node_restarts_both_and_resumes_exactly(
    uninterrupted, sonnets_dataset, tmp_path
):
    run = tmp_path / "run"
    config = _write_config(tmp_path / "run.toml", sonnets_dataset, run)
    # Rank 2 lives on the second node; it dies at the start of step 4, after step 2's checkpoint. The
    # rendezvous orders the agents the same way in every round, so rank 2 stays on that node, whose agent
    # counts the failure: its restarted workers see TORCHELASTIC_RESTART_COUNT=1 and the fault is spent.
    codes = _two_nodes(config, tmp_path, THREEFOLD_FAULT="kill:rank=2:step=3")
    assert codes == [0, 0], _logs(tmp_path)
    logs = _logs(tmp_path)
    assert "failed (exitcode: -9)" in logs, "a worker was killed"
    # Its peers may fail too (a broken collective) before their agent sees the membership change. What must
    # not happen: a restarted worker dialing a dead one's address, left in torchrun's store by the first
    # round (the agents' restart counts differ, so a key space named by the count would be shared).
    assert "connectFullMesh" not in logs, logs
    layouts = [e for e in read_events(run) if e["event"] == "layout"]
    assert len(layouts) == 2, "the workers of both nodes started twice"
    resumes = [e for e in read_events(run) if e["event"] == "resume"]
    assert sorted(e["rank"] for e in resumes) == [0, 1, 2, 3] and {e["step"] for e in resumes} == {2}
    # Bit for bit: float32 values written as JSON round-trip exactly, and so do the checkpoints.
    assert _metrics(run, "train/loss") == _metrics(uninterrupted, "train/loss")
    final = _tensors(run / "ckpt" / f"step_{STEPS}")
    reference = _tensors(uninterrupted / "ckpt" / f"step_{STEPS}")
    assert final.keys() == reference.keys() and any("::exp_avg" in k for k in final)
    assert all(torch.equal(final[k], reference[k]) for k in final)
