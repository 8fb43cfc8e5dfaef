"""Starting workers: inside torchrun (or Slurm), or as N local processes launched here.

The launcher's environment (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, ...) is read once, here, by
`world_from_env`; everything else gets a `WorldInfo`. `run_workers` is the one entry the commands use.

Whoever launches them, workers connect to a store their launcher hosts (torchrun's agent store, or
`launch_local`'s, which listens on loopback only) and die with that launcher.
"""

from __future__ import annotations

import os
import secrets
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
from threefold.reliability.control import die_with_parent, leave_on_interrupt
from threefold.reliability.events import EventLog
from threefold.reliability.faults import FaultPlan, faults_from_env
from threefold.reliability.supervisor import LauncherSignals, ProgressNote, supervise

LAUNCHER_PID_ENV = "THREEFOLD_LAUNCHER_PID"
"""Set by `launch_local` in its workers: the launcher's process id (its store is at MASTER_ADDR:PORT)."""


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
    """(host, port) of the store the launcher hosts (torchrun's agent store when the workers share it, or
    `launch_local`'s), else None: rank 0 then hosts one at MASTER_ADDR:MASTER_PORT."""
    node_rank: int = 0
    """This node's index among the job's nodes (torchrun's GROUP_RANK)."""
    launcher_pid: int | None = None
    """The process that started this worker and that it dies with (torchrun's agent or `launch_local`);
    None when it is not known to be one."""


def world_from_env() -> WorldInfo | None:
    """The torchrun-style world this process belongs to (Slurm's variables as a fallback), or None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        agent_store = None
        ours = LAUNCHER_PID_ENV in env
        if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or ours:
            agent_store = (env["MASTER_ADDR"], int(env["MASTER_PORT"]))
        launcher_pid = None
        if ours:
            launcher_pid = int(env[LAUNCHER_PID_ENV])
        elif "TORCHELASTIC_RUN_ID" in env:
            launcher_pid = os.getppid()  # torchrun's agent starts its workers itself
        rank, local_world_size = int(env["RANK"]), int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
        return WorldInfo(
            rank,
            int(env.get("LOCAL_RANK", 0)),
            int(env["WORLD_SIZE"]),
            local_world_size=local_world_size,
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
            agent_store=agent_store,
            node_rank=int(env.get("GROUP_RANK", rank // local_world_size)),
            launcher_pid=launcher_pid,
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
        host, port = world.agent_store
        client = dist.TCPStore(host, port, is_master=False, timeout=STORE_TIMEOUT)
        kwargs["store"] = round_store(client, world.rank, world.world_size)
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size, **kwargs)


STORE_TIMEOUT = timedelta(minutes=10)


def round_store(store: dist.Store, rank: int, world_size: int) -> dist.PrefixStore:
    """A key space of `store` that only this round of workers shares.

    torchrun's agent store outlives its workers, so it holds the keys of every earlier round: addresses
    of dead ranks that a restarted worker could read and fail to connect to (or hang on). Keying the
    space by the restart count would not do: each agent counts its own failures, so after one node's
    workers fail, the nodes restarted only because the membership changed keep their old count
    (pytorch/pytorch#135712). Instead rank 0 names a fresh key space and admits every rank by a nonce
    that rank wrote in this round; it re-reads the nonces of ranks that have not acknowledged, since it
    may first have read a dead predecessor's.
    """
    nonce = secrets.token_hex(8)
    if rank != 0:
        store.set(f"threefold/join/{rank}", nonce)
        store.wait([f"threefold/admit/{nonce}"])
        space = f"threefold/{store.get(f'threefold/admit/{nonce}').decode()}"
        store.set(f"{space}/ack/{rank}", "")
        return dist.PrefixStore(space, store)
    space, deadline = f"threefold/{nonce}", time.monotonic() + STORE_TIMEOUT.total_seconds()
    pending, admitted = list(range(1, world_size)), set()
    while pending:
        joins = [f"threefold/join/{r}" for r in pending]
        store.wait(joins)  # a dead predecessor's nonce may be there already
        for key in joins:
            if (their := store.get(key).decode()) not in admitted:
                store.set(f"threefold/admit/{their}", nonce)
                admitted.add(their)
        reread = time.monotonic() + 1.0  # polled: a store.wait that times out desynchronizes the client
        while pending and time.monotonic() < reread:
            if store.check([f"{space}/ack/{r}" for r in pending]):
                pending = []
            else:
                pending = [r for r in pending if not store.check([f"{space}/ack/{r}"])]
                time.sleep(0.02 if pending else 0)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"ranks {pending} never joined the rendezvous")
    return dist.PrefixStore(space, store)


def launch_local(nproc: int, argv: list[str], *, use_cuda: bool, config: Config | None = None) -> int:
    """Run `threefold <argv>` in nproc local worker processes; returns the run's exit status.

    A local run is reachable from this machine only: the launcher hosts the rendezvous store on a socket
    it binds to 127.0.0.1 itself (so no other process can take the port between choosing and binding it
    either), the workers connect to it as clients, and their gloo and NCCL sockets use the loopback
    interface. Each worker dies with the launcher (reliability.control.die_with_parent), even one killed
    by SIGKILL; reliability.supervisor watches them (`config` says where the run logs its steps).
    """
    signals = LauncherSignals()
    with signals:  # handled before the first worker starts: a Ctrl-C cannot cut the start in half
        store, port = _loopback_store()
        env = _worker_env(nproc, port, use_cuda=use_cuda)
        command = [sys.executable, "-m", "threefold.cli", *argv]
        for rank in range(nproc):
            ids = {"RANK": str(rank), "LOCAL_RANK": str(rank)}
            signals.procs.append(subprocess.Popen(command, env={**env, **ids}))
        code = supervise(signals, ProgressNote(config))
        del store  # the workers are gone: nobody is connected
    return code


def _loopback_store() -> tuple[dist.TCPStore, int]:
    """A rendezvous store listening on 127.0.0.1 only, and its port.

    TCPStore binds every interface when it opens its own socket; given a listening socket, it serves on
    that one (and owns it from then on).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    store = dist.TCPStore(
        "127.0.0.1", port, is_master=True, wait_for_workers=False, master_listen_fd=sock.detach()
    )
    return store, port


def _worker_env(nproc: int, port: int, *, use_cuda: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **{LAUNCHER_PID_ENV: str(os.getpid())},
    )
    loopback = _loopback_interface()
    if loopback:
        # gloo binds the address the host name resolves to, NCCL its first non-loopback interface;
        # one machine needs neither. A user's own choice stays.
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
        if use_cuda:
            env.setdefault("NCCL_SOCKET_IFNAME", loopback)
    if not use_cuda:
        threads = max(1, (os.cpu_count() or 1) // nproc)
        env.setdefault("OMP_NUM_THREADS", str(threads))  # share the cores instead of oversubscribing
    return env


def _loopback_interface() -> str | None:
    """The loopback interface's name ('lo' on Linux, 'lo0' on macOS), None if there is none."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), None)


Body = Callable[[Config, Mesh, torch.device, FaultPlan | None], int]
"""What a command runs on each rank, with the process group up: returns the rank's exit code."""


def run_workers(
    config: Config, body: Body, *, world: WorldInfo | None, nproc: int | None, worker_argv: list[str],
    log_layout: bool = True,
) -> int:  # fmt: skip
    """Outside torchrun (world is None): launch nproc (default: the config's world size) local workers,
    each running `threefold <worker_argv>`, and return the run's exit status. Inside: build the mesh,
    log where the ranks run when `log_layout` (`record_layout`), and return body(config, mesh, device,
    faults) on this rank."""
    faults = faults_from_env()  # test-only fault injection (THREEFOLD_FAULT); None normally
    if world is None:
        nproc = nproc or config.world_size
        check_world_size(config, nproc)
        if config.training.fp8 and not _uses_cuda(config):
            # training.device = 'auto' on a machine without a GPU: say so before the workers start (the
            # compute capability is checked on each rank, where the GPU is set up).
            raise ValueError(
                f"training.fp8 = {config.training.fp8!r} needs a CUDA GPU of compute capability >= 8.9; "
                "none is available here"
            )
        prepare_data_if_asked(config)
        return launch_local(nproc, worker_argv, use_cuda=_uses_cuda(config), config=config)

    if world.launcher_pid is not None:
        die_with_parent(world.launcher_pid)
    leave_on_interrupt()  # the training loop's StopRequest makes the first Ctrl-C a clean stop
    check_world_size(config, world.world_size)
    device = pick_device(config, world.local_rank)
    init_distributed(world, device)
    try:
        if world.local_rank == 0:
            prepare_data_if_asked(config)  # torchrun multi-node: once per node
        dist.barrier()
        p = config.parallel
        mesh = build_mesh(p.tp_size, p.dp_size, p.pp_size, p.cp_size)
        if log_layout:
            record_layout(config, world, mesh)
        return body(config, mesh, device, faults)
    finally:
        dist.destroy_process_group()


def record_layout(config: Config, world: WorldInfo, mesh: Mesh) -> None:
    """Log where each rank runs (a `layout` event in events.jsonl) and warn when a tensor-parallel group
    spans nodes: its all-reduces, the heaviest traffic, would then cross the network."""
    mine = (world.node_rank, socket.gethostname(), dist.get_process_group_ranks(mesh.tp_group))
    every: list[Any] = [None] * world.world_size
    dist.all_gather_object(every, mine)
    if world.rank != 0:
        return
    nodes = [node for node, _, _ in every]
    tp_groups = sorted({tuple(ranks) for _, _, ranks in every})
    hosts = sorted({(node, host) for node, host, _ in every})
    EventLog(config.logging.out_dir, rank=0).write(
        "layout", nodes=nodes, hosts=hosts, tp_groups=[list(g) for g in tp_groups]
    )
    for group in tp_groups:
        spanned = sorted({nodes[r] for r in group})
        if len(spanned) > 1:
            advice = f"give each node a multiple of tp_size ({mesh.tp_size}) ranks"
            print(f"threefold: warning: tensor-parallel group {list(group)} spans nodes {spanned}; {advice}",
                  file=sys.stderr, flush=True)  # fmt: skip


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
