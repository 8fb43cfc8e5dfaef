"""The local launcher as a process: where it listens, how it dies, what it says when a worker dies.

Each test starts `threefold train` with 2 CPU workers (a tiny dp=2 model) as a real subprocess tree.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist


def _write_config(tmp_path: Path, dataset: Path, *, max_steps: int = 100_000) -> Path:
    config = tmp_path / "run.toml"
    run = tmp_path / "run"
    config.write_text(
        f"""
[model]
preset = "tiny"
num_layers = 1
hidden_size = 32
num_heads = 2
num_kv_heads = 2
ffn_hidden_size = 64

[parallel]
dp_size = 2

[data]
path = "{dataset}"
seq_len = 16

[training]
max_steps = {max_steps}
global_batch_size = 4
micro_batch_size = 2
device = "cpu"
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
    return config


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _start(config: Path, **env: str) -> subprocess.Popen:
    """The launcher in a session of its own, so that a test can signal its whole process group."""
    cmd = [sys.executable, "-m", "threefold", "train", str(config), "--nproc", "2"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(**env), start_new_session=True)  # fmt: skip


def _logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum("train/loss" in json.loads(line) for line in path.read_text().splitlines() if line.strip())


def _wait_for_training(proc: subprocess.Popen, run: Path, steps: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _logged_steps(run) < steps:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stdout.read() if proc.stdout else ''}")
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _stop(proc: subprocess.Popen, pids: list[int]) -> None:
    """Clean-up: the launcher's process group, then any of the given processes still alive."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


# --- Listening sockets: loopback only -------------------------------------------------------------------


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A /proc/net/tcp{,6} address: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_address)
    return ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))


def _listening(inodes: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket among `inodes`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == "0A" and inode in inodes:  # 0A: TCP_LISTEN
                host, port = local.split(":")
                found.append((str(_address(host)), int(port, 16)))
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.timeout(180)
def test_a_local_run_listens_on_loopback_only(sonnets_dataset, tmp_path):
    proc = _start(_write_config(tmp_path, sonnets_dataset))
    workers: list[int] = []
    try:
        _wait_for_training(proc, tmp_path / "run")
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        sockets = _listening(set().union(*(_socket_inodes(pid) for pid in [proc.pid, *workers])))
    finally:
        _stop(proc, workers)
    assert sockets, "the run's rendezvous store listens somewhere"
    exposed = [s for s in sockets if not _is_loopback(s[0])]
    assert not exposed, f"listening beyond this machine: {exposed} (all: {sockets})"


# --- The launcher's death, a worker's death, Ctrl-C -----------------------------------------------------


@pytest.mark.timeout(180)
def test_workers_die_with_their_launcher(sonnets_dataset, tmp_path):
    proc = _start(_write_config(tmp_path, sonnets_dataset))
    workers: list[int] = []
    try:
        _wait_for_training(proc, tmp_path / "run")
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = [pid for pid in workers if _alive(pid)]
    finally:
        _stop(proc, workers)
    assert not orphans, f"workers {orphans} outlived their launcher by 10 s"


@pytest.mark.timeout(180)
def test_a_worker_killed_by_a_signal_is_named_and_the_run_fails(sonnets_dataset, tmp_path):
    config = _write_config(tmp_path, sonnets_dataset, max_steps=20)
    cmd = [sys.executable, "-m", "threefold", "train", str(config), "--nproc", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170,
                          env=_env(THREEFOLD_FAULT="kill:rank=1:step=3"))  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 128 + signal.SIGKILL, output
    line = next((x for x in proc.stderr.splitlines() if "rank 1 was killed by SIGKILL" in x), None)
    assert line is not None, output
    # Rank 1 dies at the start of its 4th step: steps 1-3 may be logged, step 2's checkpoint surely exists.
    assert "last logged step" in line and "newest checkpoint step_2" in line, line


@pytest.mark.timeout(180)
def test_ctrl_c_twice_leaves_at_once_with_status_130_and_no_traceback(sonnets_dataset, tmp_path):
    # A slow step keeps the workers busy when the second Ctrl-C comes, so they are not done saving yet.
    proc = _start(_write_config(tmp_path, sonnets_dataset), THREEFOLD_FAULT="slow:seconds=2")
    workers: list[int] = []
    try:
        _wait_for_training(proc, tmp_path / "run")
        workers = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        began = time.monotonic()
        output, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - began
    finally:
        _stop(proc, workers)
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "second Ctrl-C" in output, output
    assert elapsed < 10, f"took {elapsed:.1f} s to leave"
    assert not [pid for pid in workers if _alive(pid)]


# --- A store that outlives its workers: torchrun's agent store across restarts --------------------------


def _join(port: int, rank: int, world_size: int, spaces: dict) -> None:
    from threefold.launch import round_store

    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
    store = round_store(client, rank, world_size)
    store.set(f"hello/{rank}", "x")  # the new key space is shared: every rank sees every other's key
    store.wait([f"hello/{r}" for r in range(world_size)], timedelta(seconds=30))
    spaces[rank] = True


@pytest.mark.timeout(60)
def test_a_restarted_round_never_reads_a_dead_rounds_keys():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    # A dead round's leftovers: its ranks' join nonces and an address in the key space it used.
    for rank in (1, 2):
        server.set(f"threefold/join/{rank}", f"stale{rank}")
    server.set("threefold/old/hello/0", "dead")
    spaces: dict[int, bool] = {}
    threads = [threading.Thread(target=_join, args=(server.port, r, 3, spaces)) for r in (0, 1)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # rank 2 of the new round comes late: rank 0 has admitted its stale nonce by now
    late = threading.Thread(target=_join, args=(server.port, 2, 3, spaces))
    late.start()
    for t in [*threads, late]:
        t.join(timeout=40)
    assert spaces == {0: True, 1: True, 2: True}
