"""Whether a run fits in memory, checked before any worker starts.

A config that cannot fit (a hidden size in the hundreds of thousands, a micro-batch far too large) would
otherwise start its workers, allocate for a while and die in the allocator with a traceback per rank. The
memory model (plan.memory_model) estimates the most loaded rank's peak; this module compares it with what
one process has: the GPU's memory, or on CPU the host's memory shared by the processes of this node.
The check refuses only an estimate above the whole limit, so a run the model merely judges tight still
starts; the planner (`threefold plan`) is the place for margins.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from threefold.config import Config
from threefold.config.validate import check_host_memory
from threefold.plan.hardware import GIB
from threefold.plan.memory_model import estimate_memory


def process_memory_limit(config: Config, *, procs_per_node: int) -> tuple[float, str]:
    """(bytes one rank may use, a description of where that figure comes from)."""
    wanted = config.training.device
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), f"{props.name} has {props.total_memory / GIB:.1f} GiB"
    try:
        host = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf"), "host memory unknown"
    share = host / max(1, procs_per_node)
    return (
        share,
        f"host memory {host / GIB:.1f} GiB / {procs_per_node} processes = {share / GIB:.1f} GiB each",
    )


def device_memory(device: torch.device, *, ranks: int) -> float:
    """Bytes one rank may use on `device`: the GPU's memory, or on CPU the host's shared by `ranks`."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / max(1, ranks)
    except (ValueError, OSError, AttributeError):
        return float("inf")


AUTO_OFFLOAD_MARGIN = 0.05
"""The share of a GPU's memory that optimizer.offload_fraction = 'auto' leaves free (as `threefold plan`)."""


def resolve_offload(config: Config, limit: float) -> Config:
    """`config` with optimizer.offload_fraction 'auto' replaced by a number: the smallest share of the
    optimizer state on the host (in steps of 0.01) that brings the memory model's peak within
    (1 - AUTO_OFFLOAD_MARGIN) of `limit` bytes; 0 when it all fits on the GPU, 1 when even all of it on the
    host does not fit (check_fits then says so). Any other config comes back as it is."""
    opt = config.optimizer
    if opt.offload_fraction != "auto":
        return config

    def with_share(share: float) -> Config:
        return dataclasses.replace(config, optimizer=dataclasses.replace(opt, offload_fraction=share))

    if not opt.offload:
        return with_share(1.0)  # nothing is offloaded: the share decides nothing
    # The model's GPU peak falls linearly with the share (only the optimizer term moves to the host).
    all_on_gpu = estimate_memory(with_share(0.0))["total"]
    all_on_host = estimate_memory(with_share(1.0))["total"]
    room = limit * (1 - AUTO_OFFLOAD_MARGIN)
    if all_on_gpu <= room:
        return with_share(0.0)
    if all_on_host >= room or all_on_gpu <= all_on_host:
        return with_share(1.0)
    share = (all_on_gpu - room) / (all_on_gpu - all_on_host)
    return with_share(min(1.0, math.ceil(share * 100 - 1e-9) / 100))


def check_fits(config: Config, *, procs_per_node: int) -> None:
    """ValueError naming the estimate, its parts and the limit when the config cannot fit in memory."""
    limit, where = process_memory_limit(config, procs_per_node=procs_per_node)
    if config.optimizer.offload_fraction == "auto":
        config = resolve_offload(config, limit)
        check_host_memory(config)  # skipped at load time, before the share was known
    estimate = estimate_memory(config)
    if estimate["total"] <= limit:
        return
    m, p, t = config.model, config.parallel, config.training
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in estimate.items() if k != "total")
    total = estimate["total"] / GIB
    raise ValueError(
        f"this run does not fit in memory: its most loaded rank needs about {total:.1f} GiB "
        f"({parts} GiB) for model.hidden_size {m.hidden_size}, model.num_layers {m.num_layers}, "
        f"model.vocab_size {m.vocab_size}, training.micro_batch_size {t.micro_batch_size}, data.seq_len "
        f"{config.data.seq_len} on tp {p.tp_size} x pp {p.pp_size} x dp {p.dp_size}, but {where}. "
        "Use more model parallelism (parallel.tp_size, parallel.pp_size), parallel.zero, "
        "training.recompute, or a smaller micro-batch; `threefold plan` finds a layout that fits"
    )
