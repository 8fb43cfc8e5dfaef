"""Whether a run fits in memory, checked before any worker starts.

A config that cannot fit (a hidden size in the hundreds of thousands, a micro-batch far too large) would
otherwise start its workers, allocate for a while and die in the allocator with a traceback per rank. The
memory model (plan.memory_model) estimates the most loaded rank's peak; this module compares it with what
one process has: the GPU's memory, or on CPU the host's memory shared by the processes of this node.
The check refuses only an estimate above the whole limit, so a run the model merely judges tight still
starts; the planner (`threefold plan`) is the place for margins.
"""

from __future__ import annotations

import os

import torch

from threefold.config import Config
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


def check_fits(config: Config, *, procs_per_node: int) -> None:
    """ValueError naming the estimate, its parts and the limit when the config cannot fit in memory."""
    estimate = estimate_memory(config)
    limit, where = process_memory_limit(config, procs_per_node=procs_per_node)
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
