"""`threefold bench`: time the real training step of a config and report it as one JSON line.

It builds exactly what `threefold train` builds (model chunks, gradient sync, optimizer, schedule) and
runs `warmup + steps` optimizer steps on synthetic tokens (uniform ids, no data file needed) or on the
config's prepared dataset. Steps are timed with CUDA events recorded between steps, so the loop has no
host synchronization until the end. Figures follow BENCHMARKS.md: tokens/s per GPU and model TFLOP/s
from the median step time of the timed steps, MFU against the GPU's dense bf16 peak, and the peak
memory allocated on every rank.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from threefold.config import Config
from threefold.metrics import count_parameters, flops_per_token, mfu, peak_flops
from threefold.parallel.mesh import Mesh
from threefold.plan.memory_model import estimate_memory
from threefold.train import build, context_shard, train_loader, train_step, wait_params

Batch = tuple[torch.Tensor, torch.Tensor]
GIB = 2**30


def synthetic_steps(config: Config, mesh: Mesh, device: torch.device, count: int) -> list[list[Batch]]:
    """`count` steps of this data-parallel rank's micro-batches of uniform random token ids.

    Each step's global batch is drawn from the seed alone and every data-parallel rank takes its slice,
    so any layout of the same config trains on the same tokens (losses compare across layouts).
    """
    t, seq = config.training, config.data.seq_len
    per_rank = t.global_batch_size // mesh.dp_size
    gen = torch.Generator(device="cpu").manual_seed(t.seed)
    steps = []
    for _ in range(count):
        tokens = torch.randint(0, config.model.vocab_size, (t.global_batch_size, seq + 1), generator=gen)
        mine = tokens[mesh.dp_rank * per_rank : (mesh.dp_rank + 1) * per_rank]
        x, y = mine[:, :-1].to(device), mine[:, 1:].to(device)
        micro = list(zip(x.split(t.micro_batch_size), y.split(t.micro_batch_size), strict=True))
        steps.append(context_shard(micro, mesh))
    return steps


def real_steps(config: Config, mesh: Mesh, device: torch.device, count: int) -> list[list[Batch]]:
    """`count` steps of this data-parallel rank's micro-batches from the config's dataset, as training reads
    them."""
    loader = train_loader(config, mesh)
    return [
        [(x.to(device), y.to(device)) for x, y in context_shard(loader.next_batch(), mesh)]
        for _ in range(count)
    ]


def run_bench(
    config: Config, mesh: Mesh, device: torch.device, *, steps: int, warmup: int, tokens: str = "synthetic"
) -> dict[str, Any] | None:
    """Time `steps` training steps after `warmup` untimed ones; the record on rank 0, None elsewhere."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench needs steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if tokens not in ("synthetic", "real"):
        raise ValueError(f"tokens must be 'synthetic' or 'real', got {tokens!r}")
    cuda = device.type == "cuda"
    trainer = build(config, mesh, device)
    config = trainer.config  # optimizer.offload_fraction 'auto' resolved to the share the run uses
    make = synthetic_steps if tokens == "synthetic" else real_steps
    data = make(config, mesh, device, min(warmup + steps, 8))  # a few distinct batches, reused
    spans = [trainer.executor.document_spans(batches) for batches in data]  # found once, before timing
    losses: list[torch.Tensor] = []
    marks: list[Any] = []
    for i in range(warmup + steps):
        if i >= warmup:
            marks.append(_mark(cuda))
        losses.append(train_step(trainer, data[i % len(data)], i, spans=spans[i % len(data)]).loss)
    wait_params(trainer)  # the last step's parameter all-gather belongs to its time
    marks.append(_mark(cuda))
    if cuda:
        torch.cuda.synchronize(device)
        seconds = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:], strict=False)]
    else:
        seconds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    # Not measured off the GPU: None (null in JSON, "n/a" printed), never a zero that reads as a figure.
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else None
    reserved = torch.cuda.max_memory_reserved(device) / GIB if cuda else None
    per_rank: list[Any] = [None] * mesh.world_size
    dist.all_gather_object(per_rank, (peak, reserved, statistics.median(seconds)))
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.remove_hooks()
    if mesh.rank != 0:
        return None
    return _record(config, mesh, device, seconds, per_rank, [float(v) for v in losses], tokens, warmup)


def _mark(cuda: bool) -> Any:
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _record(
    config: Config,
    mesh: Mesh,
    device: torch.device,
    seconds: list[float],
    per_rank: list[Any],
    losses: list[float],
    tokens: str,
    warmup: int,
) -> dict[str, Any]:
    m, p, t = config.model, config.parallel, config.training
    # The slowest rank sets the pace; every rank's median is within noise of it in a lock-step run.
    median = max(r[2] for r in per_rank)
    tokens_per_s = t.global_batch_size * config.data.seq_len / median / mesh.world_size
    fpt = flops_per_token(m, config.data.seq_len)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    util = mfu(tokens_per_s, fpt, peak_flops(name))
    measured = per_rank[0][0]
    deciles = statistics.quantiles(seconds, n=10) if len(seconds) > 1 else [seconds[0]] * 9
    return {
        "model": m.preset or "custom",
        "parameters": count_parameters(m)["total"],
        "tp": p.tp_size,
        "pp": p.pp_size,
        "dp": p.dp_size,
        "cp": p.cp_size,
        "cp_attention": p.cp_attention,
        "v": p.num_model_chunks,
        "schedule": p.pipeline_schedule,
        "zero": p.zero,
        "offload": config.optimizer.offload,
        "offload_fraction": config.optimizer.offload_fraction,
        "sequence_parallel": p.sequence_parallel,
        "overlap_tp_comm": p.overlap_tp_comm,
        "micro_batch_size": t.micro_batch_size,
        "global_batch_size": t.global_batch_size,
        "seq_len": config.data.seq_len,
        "recompute": t.recompute,
        "compile": t.compile,
        "dtype": t.dtype,
        "attention": t.attention_backend,
        "mlp": t.mlp_backend,
        "tokens": tokens,
        "steps": len(seconds),
        "warmup": warmup,
        "tokens_per_s_per_gpu": tokens_per_s,
        "tflops_per_gpu": tokens_per_s * fpt / 1e12,
        "mfu": util,
        "step_time_median_s": median,
        "step_time_p10_s": deciles[0],
        "step_time_p90_s": deciles[-1],
        "step_time_spread": (deciles[-1] - deciles[0]) / median,
        "peak_memory_gib": None if measured is None else max(r[0] for r in per_rank),
        "peak_memory_gib_per_rank": None if measured is None else [round(r[0], 3) for r in per_rank],
        "reserved_memory_gib": None if measured is None else max(r[1] for r in per_rank),
        "estimated_memory_gib": estimate_memory(config)["total"] / GIB,
        "losses": losses,
        "device": name,
        "world_size": mesh.world_size,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }


def format_record(record: dict[str, Any]) -> str:
    """A readable summary of one bench record."""
    layout = (
        f"tp={record['tp']} pp={record['pp']} dp={record['dp']} v={record['v']} ({record['schedule']}), "
        f"micro-batch {record['micro_batch_size']}, global batch {record['global_batch_size']}, "
        f"seq {record['seq_len']}, recompute {record['recompute']}, zero {record['zero']}, "
        f"compile {record['compile']}, {record['dtype']}"
    )
    util = f"{record['mfu']:.1%}" if record["mfu"] is not None else "n/a (unknown peak)"
    rows = [
        ("model", f"{record['model']} ({record['parameters'] / 1e9:.2f}B parameters)"),
        ("layout", layout),
        ("device", f"{record['world_size']} x {record['device']}, torch {record['torch']}"),
        ("tokens/s/GPU", f"{record['tokens_per_s_per_gpu']:,.0f}"),
        ("TFLOP/s/GPU", f"{record['tflops_per_gpu']:.3g} (model FLOPs, 6N + 12lhs per token)"),
        ("MFU", util),
        (
            "step time",
            f"median {record['step_time_median_s'] * 1e3:.1f} ms over {record['steps']} steps, "
            f"p10-p90 {record['step_time_p10_s'] * 1e3:.1f}-{record['step_time_p90_s'] * 1e3:.1f} ms",
        ),
        (
            "peak memory",
            f"{record['peak_memory_gib']:.2f} GiB (max over ranks; reserved "
            f"{record['reserved_memory_gib']:.2f} GiB; estimated {record['estimated_memory_gib']:.2f} GiB)"
            if record["peak_memory_gib"] is not None
            else f"n/a (measured on GPUs only; estimated {record['estimated_memory_gib']:.2f} GiB)",
        ),  # fmt: skip
        ("losses", " ".join(f"{v:.4f}" for v in record["losses"][:8])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def to_json(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=False)
