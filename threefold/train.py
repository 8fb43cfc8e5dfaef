"""train(config): config -> model -> gradient sync -> optimizer -> loop (with evaluation and metrics)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from threefold.checkpoint import Checkpointer
from threefold.config import Config
from threefold.data.dataset import BatchLoader, TokenDataset, eval_batches
from threefold.model.transformer import Transformer, build_model, use_attention_backend
from threefold.optim import Optimizer
from threefold.parallel import track
from threefold.parallel.data_parallel import GradSync, all_reduce_sequence_parallel_grads
from threefold.parallel.layers import TPContext
from threefold.parallel.mesh import Mesh
from threefold.pipeline.executor import PipelineExecutor, connect_neighbours
from threefold.pipeline.partition import chunk_layer_ranges, chunks_of_rank
from threefold.pipeline.schedules import Action, add_communication, build_schedule, forward_only
from threefold.reliability.control import ControlChannel, StopRequest
from threefold.reliability.faults import FaultPlan
from threefold.reliability.runguard import RunGuard, Synced, check_data, resume, rollback
from threefold.report import Reporter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    """Training loss of every step (mean over the global batch)."""
    val_losses: dict[int, float] = field(default_factory=dict)
    grad_norms: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    """Steps (1-based) whose update was skipped for a non-finite loss or gradient norm."""
    rollbacks: list[tuple[int, int]] = field(default_factory=list)
    """(step of the loss spike, step of the checkpoint reloaded), 1-based."""
    steps_done: int = 0
    stopped_early: bool = False
    trainer: Trainer | None = None


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
    tp = TPContext(mesh.tp_group, p.sequence_parallel, recompute=t.recompute, overlap_comm=p.overlap_tp_comm)
    chunks = {
        c: build_model(
            config.model,
            tp,
            seed=t.seed,
            device=device,
            dtype=DTYPES[t.dtype],
            first_layer=ranges[c][0],
            last_layer=ranges[c][1],
            has_embedding=c == 0,
            has_head=c == num_chunks - 1,
            compiled=t.compile,
        )
        for c in chunks_of_rank(mesh.pp_rank, p.pp_size, p.num_model_chunks)
    }
    tied_across_stages = config.model.tie_embeddings and p.pp_size > 1
    grad_syncs = {
        c: GradSync(
            list(chunk.parameters()),
            dp_group=mesh.dp_group,
            bucket_mb=p.dp_bucket_mb,
            zero=p.zero,
            solo=[chunk.embed_tokens.weight] if tied_across_stages and hasattr(chunk, "embed_tokens") else [],
        )
        for c, chunk in chunks.items()
    }
    if p.zero and mesh.dp_size > 1:
        for c, chunk in chunks.items():
            chunk.set_before_use(grad_syncs[c].wait_for)  # the parameter all-gather overlaps the forward
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


def train_loader(config: Config, mesh: Mesh, train_set: TokenDataset | None = None) -> BatchLoader:
    """This data-parallel rank's batches of the training split (opened here unless given)."""
    t = config.training
    if train_set is None:
        train_set = TokenDataset(config.data.path, "train", config.data.seq_len)
    return BatchLoader(
        train_set,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        dp_rank=mesh.dp_rank,
        dp_size=mesh.dp_size,
        seed=t.seed,
    )


def wait_params(trainer: Trainer) -> None:
    """Block until the ZeRO parameter all-gathers of the last step have landed (a no-op without ZeRO)."""
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.wait_params()


def _pipeline_sum(value: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Losses live on the last stage: share them with every stage (the logger is rank 0)."""
    if mesh.pp_size > 1:
        with track.collective(mesh.pp_group, "all_reduce(loss)"):
            dist.all_reduce(value, group=mesh.pp_group)
    return value


def _sync_tied_embedding(trainer: Trainer) -> None:
    """Sum the tied embedding's gradient over its two holders: the first and the last pipeline stage."""
    group = trainer.mesh.embedding_group
    if group is None or not trainer.config.model.tie_embeddings:
        return
    holder = 0 if 0 in trainer.chunks else trainer.executor.last_chunk
    chunk = trainer.chunks[holder]
    with track.collective(group, "all_reduce(tied embedding grad)"):
        dist.all_reduce(chunk.embed_tokens.weight.main_grad, group=group)  # type: ignore[attr-defined]


def train_step(
    trainer: Trainer, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """One optimizer step over this rank's micro-batches.

    Returns (global mean loss, grad norm, lr, skipped) as device tensors (lr a float); `skipped` is set,
    identically on every rank, when the loss or the norm is not finite and the update was not applied.
    """
    mesh = trainer.mesh
    num_microbatches = len(micro_batches)
    loss_sum = trainer.executor.run(
        trainer.schedule, micro_batches, loss_scale=1.0 / num_microbatches, train=True
    )
    track.set_action("gradient sync")
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.finish()
    all_reduce_sequence_parallel_grads(trainer.optimizer.params, mesh.tp_group)
    _sync_tied_embedding(trainer)
    # The loss is reduced before the update so that a non-finite loss can veto it on every rank.
    track.set_action("loss reduction")
    loss = _pipeline_sum(loss_sum / (num_microbatches * mesh.dp_size), mesh)
    if mesh.dp_size > 1:
        with track.collective(mesh.dp_group, "all_reduce(loss)"):
            dist.all_reduce(loss, group=mesh.dp_group)
    bad_loss = ~torch.isfinite(loss)
    track.set_action("optimizer step")
    wait_params(trainer)  # a parameter no forward used may still be arriving from the last step
    norm, lr = trainer.optimizer.step(step, found_inf=bad_loss)
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.gather_params()
        grad_sync.reset()
    return loss, norm, lr, bad_loss | ~torch.isfinite(norm)


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
    with track.collective(mesh.dp_group, "all_reduce(validation loss)"):
        dist.all_reduce(total, group=mesh.dp_group)
    with track.waiting_for(mesh.dp_group, "host sync (validation loss)"):
        return float(total)


def _to_device(batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> list:
    return [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in batches]


def train(
    config: Config, mesh: Mesh, device: torch.device, *, faults: FaultPlan | None = None
) -> TrainResult:
    """Run the training loop on this rank; every rank of the mesh calls it.

    `faults` (test-only, see threefold.reliability.faults) injects crashes, hangs, signals and NaNs.
    """
    t, ckpt = config.training, config.checkpoint
    control = ControlChannel()
    check_data(config, control, mesh.rank)
    trainer = build(config, mesh, device)
    train_set = TokenDataset(config.data.path, "train", config.data.seq_len)
    val_set = TokenDataset(config.data.path, "val", config.data.seq_len)
    loader = train_loader(config, mesh, train_set)
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
    guard = RunGuard(config, mesh, control, faults=faults)
    start_step = resume(trainer, loader, control, guard.events)
    checkpointer = (
        Checkpointer(ckpt.dir, keep_last=ckpt.keep_last, asynchronous=ckpt.asynchronous) if ckpt.dir else None
    )
    reporter = Reporter(config, mesh, device, enabled=mesh.rank == 0, start_step=start_step)
    result = TrainResult(trainer=trainer)
    pending: list[tuple[int, torch.Tensor, torch.Tensor, float, torch.Tensor]] = []
    start = time.perf_counter()
    with StopRequest(config.reliability.preemption_deadline) as stop, reporter, guard:
        if t.eval_interval > 0 and start_step == 0:  # the starting point of the validation curve
            result.val_losses[0] = evaluate(trainer, val_batches)
            reporter.validation(0, result.val_losses[0])
        for step in range(start_step, t.max_steps):
            guard.begin_step(step, trainer)
            batches = _to_device(loader.next_batch(), device)
            loss, norm, lr, skipped = train_step(trainer, batches, step)
            pending.append((step, loss, norm, lr, skipped))
            last = step == t.max_steps - 1
            out_of_time = t.max_minutes > 0 and (time.perf_counter() - start) / 60 >= t.max_minutes
            # Every step: a signal reaching any rank stops all of them after this same step.
            stop_now, late = guard.end_step(stop_requested=stop.requested, out_of_time=out_of_time)
            result.stopped_early = (stop_now or late) and not last
            spike_step = None
            if (step + 1) % config.logging.log_interval == 0 or last or result.stopped_early:
                # The one host sync of the interval: losses, norms and skip flags.
                with track.waiting_for(None, "host sync (losses)"):
                    synced: list[Synced] = [
                        (s, float(loss_s), float(norm_s), lr_s, bool(skip_s))
                        for s, loss_s, norm_s, lr_s, skip_s in pending
                    ]
                pending.clear()
                result.losses += [x[1] for x in synced]
                result.grad_norms += [x[2] for x in synced]
                result.skipped += [x[0] + 1 for x in synced if x[4]]
                reporter.interval([x[:4] for x in synced])
                spike_step = guard.interval(synced, reporter.note)  # raises after too many skips
            result.steps_done = step + 1
            if spike_step is not None:
                _roll_back(trainer, checkpointer, spike_step, result, reporter)
            if t.eval_interval > 0 and ((step + 1) % t.eval_interval == 0 or last or result.stopped_early):
                track.set_action("evaluation")
                val = evaluate(trainer, val_batches)
                result.val_losses[step + 1] = val
                reporter.validation(step + 1, val)
            if checkpointer and (
                (ckpt.interval and (step + 1) % ckpt.interval == 0) or last or result.stopped_early
            ):
                track.set_action("checkpoint")
                began = time.perf_counter()
                path = checkpointer.save(trainer, step=step + 1, consumed_samples=loader.consumed_samples)
                blocked = time.perf_counter() - began
                reporter.checkpoint(step + 1, path, blocked)
            if result.stopped_early:
                why = (
                    f"interrupted by {stop.signal_name or 'a signal to another rank'}"
                    if stop_now
                    else "time limit"
                )
                if mesh.rank == 0:
                    guard.events.write("stopped", step=step + 1, reason=why)
                reporter.note(f"stopped after step {step + 1} ({why})")
                break
        if checkpointer:
            checkpointer.finish(trainer)  # an asynchronous save still in flight
    wait_params(trainer)
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.remove_hooks()
    return result


def _roll_back(
    trainer: Trainer,
    checkpointer: Checkpointer | None,
    spike_step: int,
    result: TrainResult,
    reporter: Reporter,
) -> None:
    """Reload the newest checkpoint from before the spike at 0-based `spike_step` (see reliability)."""
    track.set_action("rollback")
    loaded = (
        rollback(trainer, checkpointer, trainer.config.checkpoint.dir, spike_step) if checkpointer else None
    )
    if loaded is None:
        reporter.note(
            f"loss spike at step {spike_step + 1}, but no checkpoint from before it to roll back to"
        )
        return
    result.rollbacks.append((spike_step + 1, loaded))
    reporter.note(f"loss spike at step {spike_step + 1}: rolled back to the checkpoint of step {loaded}")
