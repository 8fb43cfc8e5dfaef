"""train(config): config -> model -> gradient sync -> optimizer -> loop (with evaluation and metrics)."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from threefold.checkpoint import Checkpointer, latest_checkpoint, load_checkpoint
from threefold.config import Config
from threefold.data import BatchLoader, TokenDataset, eval_batches
from threefold.data_parallel import GradSync, all_reduce_sequence_parallel_grads
from threefold.mesh import Mesh
from threefold.model import Transformer, build_model, use_attention_backend
from threefold.optim import Optimizer
from threefold.partition import chunk_layer_ranges, chunks_of_rank
from threefold.pipeline import PipelineExecutor, connect_neighbours
from threefold.report import Reporter
from threefold.schedules import Action, add_communication, build_schedule, forward_only

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    """Training loss of every step (mean over the global batch)."""
    val_losses: dict[int, float] = field(default_factory=dict)
    grad_norms: list[float] = field(default_factory=list)
    steps_done: int = 0
    stopped_early: bool = False
    trainer: Trainer | None = None


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks at log steps, so all ranks stop together."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test harness): no handler
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: give up on the clean stop
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Trainer:
    """This rank's model chunks with what trains them."""

    chunks: dict[int, Transformer]
    """Global chunk index -> model chunk (one per model chunk held by this pipeline rank)."""
    grad_syncs: dict[int, GradSync]
    optimizer: Optimizer
    executor: PipelineExecutor
    schedule: list[Action]
    """This rank's training step: forwards, backwards and transfers."""
    config: Config
    mesh: Mesh


def build(config: Config, mesh: Mesh, device: torch.device) -> Trainer:
    """The model chunks of this rank, their gradient synchronizers, the optimizer and the schedule."""
    p, t = config.parallel, config.training
    ranges = chunk_layer_ranges(config.model.num_layers, p.pp_size, p.num_model_chunks)
    num_chunks = len(ranges)
    if device.type == "cuda":
        use_attention_backend(t.attention_backend)
    chunks = {}
    for c in chunks_of_rank(mesh.pp_rank, p.pp_size, p.num_model_chunks):
        chunk = build_model(
            config.model,
            tp_group=mesh.tp_group,
            sequence_parallel=p.sequence_parallel,
            seed=t.seed,
            device=device,
            dtype=DTYPES[t.dtype],
            first_layer=ranges[c][0],
            last_layer=ranges[c][1],
            has_embedding=c == 0,
            has_head=c == num_chunks - 1,
            recompute=t.recompute,
        )
        if t.compile:
            for layer in chunk.layers.values():
                layer.compile()
            chunk.compile_loss = True
        chunks[c] = chunk
    tied = [
        chunk.embed_tokens.weight
        for chunk in chunks.values()
        if config.model.tie_embeddings and p.pp_size > 1 and hasattr(chunk, "embed_tokens")
    ]
    grad_syncs = {
        c: GradSync(
            list(chunk.parameters()),
            dp_group=mesh.dp_group,
            bucket_mb=p.dp_bucket_mb,
            zero=p.zero,
            solo=[w for w in tied if any(w is q for q in chunk.parameters())],
        )
        for c, chunk in chunks.items()
    }
    owned = [r for c in sorted(grad_syncs) for r in grad_syncs[c].owned_ranges()]
    optimizer = Optimizer(owned, config.optimizer, mesh=mesh, max_steps=t.max_steps, zero=p.zero)
    seq_local = config.data.seq_len // (p.tp_size if p.sequence_parallel else 1)
    executor = PipelineExecutor(
        chunks,
        mesh,
        num_chunks=num_chunks,
        boundary_shape=(t.micro_batch_size, seq_local, config.model.hidden_size),
        dtype=DTYPES[t.dtype],
        device=device,
        scatter_gather=p.scatter_gather,
        grad_syncs=grad_syncs,
    )
    schedule = build_schedule(p.pipeline_schedule, p.pp_size, p.num_model_chunks, config.num_microbatches)
    connect_neighbours(mesh, device)
    return Trainer(chunks, grad_syncs, optimizer, executor, schedule[mesh.pp_rank], config, mesh)


def _pipeline_sum(value: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Losses live on the last stage: share them with every stage (the logger is rank 0)."""
    if mesh.pp_size > 1:
        dist.all_reduce(value, group=mesh.pp_group)
    return value


def _sync_tied_embedding(trainer: Trainer) -> None:
    """Sum the tied embedding's gradient over its two holders: the first and the last pipeline stage."""
    group = trainer.mesh.embedding_group
    if group is None or not trainer.config.model.tie_embeddings:
        return
    holder = 0 if 0 in trainer.chunks else trainer.executor.last_chunk
    chunk = trainer.chunks[holder]
    dist.all_reduce(chunk.embed_tokens.weight.main_grad, group=group)  # type: ignore[attr-defined]


def train_step(
    trainer: Trainer, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step over this rank's micro-batches; returns (global mean loss, grad norm, lr)."""
    mesh = trainer.mesh
    num_microbatches = len(micro_batches)
    loss_sum = trainer.executor.run(
        trainer.schedule, micro_batches, loss_scale=1.0 / num_microbatches, train=True
    )
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.finish()
    all_reduce_sequence_parallel_grads(trainer.optimizer.params, mesh.tp_group)
    _sync_tied_embedding(trainer)
    norm, lr = trainer.optimizer.step(step)
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.gather_params()
        grad_sync.reset()
    loss = _pipeline_sum(loss_sum / (num_microbatches * mesh.dp_size), mesh)
    if mesh.dp_size > 1:
        dist.all_reduce(loss, group=mesh.dp_group)
    return loss, norm, lr


@torch.no_grad()
def evaluate(trainer: Trainer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    mesh, p = trainer.mesh, trainer.config.parallel
    for chunk in trainer.chunks.values():
        chunk.eval()
    steps = forward_only(mesh.pp_rank, p.pp_size, p.num_model_chunks, len(batches))
    actions = add_communication(steps, mesh.pp_rank, p.pp_size, p.num_model_chunks)
    total = trainer.executor.run(actions, batches, loss_scale=1.0, train=False)
    for chunk in trainer.chunks.values():
        chunk.train()
    total = _pipeline_sum(total / (len(batches) * mesh.dp_size), mesh)
    dist.all_reduce(total, group=mesh.dp_group)
    return float(total)


def _resume(trainer: Trainer, loader: BatchLoader) -> int:
    """Load `checkpoint.dir`'s latest checkpoint, else `checkpoint.load`; returns the step to start at."""
    ckpt = trainer.config.checkpoint
    path = latest_checkpoint(ckpt.dir) if ckpt.dir else None
    if path is None and ckpt.load:
        path = Path(ckpt.load)
    if path is None:
        return 0
    manifest = load_checkpoint(trainer, path)
    loader.load_state_dict({"consumed_samples": manifest["consumed_samples"]})
    return int(manifest["step"])


def _to_device(batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> list:
    return [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in batches]


def train(config: Config, mesh: Mesh, device: torch.device) -> TrainResult:
    """Run the training loop on this rank; every rank of the mesh calls it."""
    t = config.training
    trainer = build(config, mesh, device)
    train_set = TokenDataset(config.data.path, "train", config.data.seq_len)
    val_set = TokenDataset(config.data.path, "val", config.data.seq_len)
    loader = BatchLoader(
        train_set,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        dp_rank=mesh.dp_rank,
        dp_size=mesh.dp_size,
        seed=t.seed,
    )
    val_batches = _to_device(
        eval_batches(
            val_set,
            micro_batch_size=t.micro_batch_size,
            num_batches=t.eval_batches // mesh.dp_size,
            dp_rank=mesh.dp_rank,
            dp_size=mesh.dp_size,
        ),
        device,
    )
    start_step = _resume(trainer, loader)
    ckpt = config.checkpoint
    checkpointer = (
        Checkpointer(ckpt.dir, keep_last=ckpt.keep_last, asynchronous=ckpt.asynchronous) if ckpt.dir else None
    )
    is_logger = mesh.rank == 0
    reporter = Reporter(config, mesh, device, enabled=is_logger, start_step=start_step)
    result = TrainResult(trainer=trainer)
    pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
    start = time.perf_counter()
    with StopRequest() as stop, reporter:
        if t.eval_interval > 0 and start_step == 0:  # the starting point of the validation curve
            result.val_losses[0] = evaluate(trainer, val_batches)
            reporter.validation(0, result.val_losses[0])
        for step in range(start_step, t.max_steps):
            batches = _to_device(loader.next_batch(), device)
            loss, norm, lr = train_step(trainer, batches, step)
            pending.append((step, loss, norm, lr))
            last = step == t.max_steps - 1
            if (step + 1) % config.logging.log_interval == 0 or last:
                # The one host sync of the interval: losses, norms, and whether anyone wants to stop.
                synced = [(s, float(loss_s), float(norm_s), lr_s) for s, loss_s, norm_s, lr_s in pending]
                pending.clear()
                result.losses += [loss_s for _, loss_s, _, _ in synced]
                result.grad_norms += [norm_s for _, _, norm_s, _ in synced]
                reporter.interval(synced)
                minutes = (time.perf_counter() - start) / 60
                out_of_time = t.max_minutes > 0 and minutes >= t.max_minutes
                flag = torch.tensor([float(stop.requested or out_of_time)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() > 0 and not last:
                    result.stopped_early = True
            result.steps_done = step + 1
            if t.eval_interval > 0 and ((step + 1) % t.eval_interval == 0 or last or result.stopped_early):
                val = evaluate(trainer, val_batches)
                result.val_losses[step + 1] = val
                reporter.validation(step + 1, val)
            if checkpointer and (
                (ckpt.interval and (step + 1) % ckpt.interval == 0) or last or result.stopped_early
            ):
                began = time.perf_counter()
                path = checkpointer.save(trainer, step=step + 1, consumed_samples=loader.consumed_samples)
                blocked = time.perf_counter() - began
                reporter.checkpoint(step + 1, path, blocked)
            if result.stopped_early:
                reporter.note(
                    f"stopped after step {step + 1} ({'interrupted' if stop.requested else 'time limit'})"
                )
                break
    if checkpointer:
        checkpointer.finish(trainer)  # an asynchronous save still in flight
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.remove_hooks()
    return result
