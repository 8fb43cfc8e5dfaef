"""Starting workers: inside torchrun (or Slurm), or as N local processes launched here.

The launcher's environment (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, ...) is read once, here, by
`world_from_env`; everything else gets a `WorldInfo`. `run_workers` is the one entry the commands use.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from threefold.config import Config, check_world_size
from threefold.parallel.mesh import Mesh, build_mesh
from threefold.reliability.faults import FaultPlan, faults_from_env


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int = field(kw_only=True)
    """Ranks on this node (LOCAL_WORLD_SIZE; the whole world when the launcher does not say)."""
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
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
            agent_store=agent_store,
        )
    return None


def pick_device(config: Config, local_rank: int) -> torch.device:
    if _uses_cuda(config):
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


Body = Callable[[Config, Mesh, torch.device, FaultPlan | None], int]
"""What a command runs on each rank, with the process group up: returns the rank's exit code."""


def run_workers(
    config: Config, body: Body, *, world: WorldInfo | None, nproc: int | None, worker_argv: list[str]
) -> int:
    """Outside torchrun (world is None): launch nproc (default: the config's world size) local workers,
    each running `threefold <worker_argv>`, and return the first failing exit code. Inside: build the
    mesh and return body(config, mesh, device, faults) on this rank."""
    faults = faults_from_env()  # test-only fault injection (THREEFOLD_FAULT); None normally
    if world is None:
        nproc = nproc or config.world_size
        check_world_size(config, nproc)
        prepare_data_if_asked(config)
        return launch_local(nproc, worker_argv, use_cuda=_uses_cuda(config))

    check_world_size(config, world.world_size)
    device = pick_device(config, world.local_rank)
    init_distributed(world, device)
    try:
        if world.local_rank == 0:
            prepare_data_if_asked(config)  # torchrun multi-node: once per node
        dist.barrier()
        p = config.parallel
        return body(config, build_mesh(p.tp_size, p.dp_size, p.pp_size), device, faults)
    finally:
        dist.destroy_process_group()


def _uses_cuda(config: Config) -> bool:
    wanted = config.training.device
    return wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())


def prepare_data_if_asked(config: Config) -> None:
    """Write the Shakespeare dataset when data.prepare_shakespeare asks for it and it is not there yet."""
    d = config.data
    if d.prepare_shakespeare and not (Path(d.path) / "meta.json").is_file():
        from threefold.data.prepare import prepare_shakespeare

        print(f"preparing the Shakespeare dataset in {d.path} (first run only)", flush=True)
        prepare_shakespeare(d.path)
