"""Starting workers: inside torchrun (or Slurm), or as N local processes launched here.

The environment is read once, here, at start-up; nothing below the CLI reads it again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from threefold.config import Config


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int
    restart_count: int = 0
    """How many times torchrun restarted this job's workers (TORCHELASTIC_RESTART_COUNT)."""
    agent_store: tuple[str, int] | None = None
    """(host, port) of torchrun's own store when the workers share it, else None."""


def world_from_env() -> WorldInfo | None:
    """The torchrun-style world this process belongs to (Slurm's variables as a fallback), or None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        agent_store = None
        if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            agent_store = (env["MASTER_ADDR"], int(env["MASTER_PORT"]))
        return WorldInfo(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env["WORLD_SIZE"]),
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
            agent_store=agent_store,
        )
    return None


def pick_device(config: Config, local_rank: int) -> torch.device:
    wanted = config.training.device
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("training.device = 'cuda' but no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(world: WorldInfo, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    if world.agent_store is not None:
        # torchrun keeps one store for all restarts of a job (same host and port), so a restarted
        # worker could read the addresses its dead predecessors published and fail to connect (or
        # hang). A key space per attempt keeps restarts apart.
        host, port = world.agent_store
        client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(minutes=10))
        kwargs["store"] = dist.PrefixStore(f"threefold/attempt_{world.restart_count}", client)
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(nproc: int, argv: list[str], *, use_cuda: bool) -> int:
    """Run `threefold <argv>` in nproc local worker processes; returns the first failing exit code."""
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        if not use_cuda:
            env.setdefault("OMP_NUM_THREADS", str(threads))  # share the cores instead of oversubscribing
        procs.append(subprocess.Popen([sys.executable, "-m", "threefold.cli", *argv], env=env))
    code = 0

    def forward(signum: int, frame: Any) -> None:
        # A scheduler's preemption warning reaches the launcher: pass it on and let the workers save.
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while procs:
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                if rc != 0 and code == 0:
                    code = rc
                    # One worker died: the rest would wait forever in a collective. SIGTERM would ask them
                    # to save a checkpoint, which needs the dead peer; the last checkpoint stays instead.
                    for other in procs:
                        other.kill()
            time.sleep(0.1)
    except KeyboardInterrupt:
        # The workers got the same Ctrl-C and are finishing their step; give them time, then insist.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        deadline = time.time() + 60
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
        code = 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
