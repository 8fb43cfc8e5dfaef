"""train(config): config -> model -> gradient sync -> optimizer -> loop (with evaluation and metrics).

Each iteration of the loop: one training step, the stop agreement, then the duties, each behind one
condition (`Cadence` says when, `_Duties` does it): log (may roll back on a loss spike), evaluate, sample,
save, stop.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from threefold.checkpoint import Checkpointer
from threefold.config import Config, TrainingConfig
from threefold.data.blend import BlendLoader, BlendSource, val_loss
from threefold.data.dataset import (
    BatchLoader,
    SampleLoader,
    TokenDataset,
    eval_batches,
    read_meta,
    to_device,
)
from threefold.infer.samples import Sampler
from threefold.metrics import count_parameters
from threefold.model.fa4 import check_fa4_device
from threefold.model.quack_mlp import check_quack_device
from threefold.model.quack_mlp import kernels as quack_kernels
from threefold.model.transformer import Transformer, build_model, use_attention_backend
from threefold.optim import Optimizer
from threefold.parallel import track
from threefold.parallel.context import ContextParallel, split_sequence
from threefold.parallel.data_parallel import GradSync, all_reduce_tp_replicated_grads
from threefold.parallel.fp8_cache import Float8WeightCache
from threefold.parallel.layers import TPContext
from threefold.parallel.mesh import Mesh
from threefold.parallel.weight_grad import WeightGradQueue
from threefold.parallel.zero_params import ParamGather, WaitForGather
from threefold.pipeline.executor import Batch, PipelineExecutor, connect_neighbours
from threefold.pipeline.partition import chunk_layer_ranges, chunks_of_rank, end_layer_costs
from threefold.pipeline.schedules import (
    SPLIT_BACKWARD,
    V_SHAPED,
    Action,
    add_communication,
    build_schedule,
    forward_only,
)
from threefold.reliability.collector import CollectorSchedule
from threefold.reliability.control import ControlChannel, StopRequest
from threefold.reliability.faults import FaultPlan
from threefold.reliability.runguard import RunGuard, check_data, hold_run_directories, resume, rollback
from threefold.report import Reporter, Speed, StepStats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUEUED_DEVICES = ("cuda",)
"""Device types whose work the host queues ahead of it, where a log read once the next step is queued
(`Cadence.log_late`) keeps the device busy. On the CPU a step has run when it returns: a late read gains
nothing there. Either way a log window ends where its last step was queued (`PendingStats.queued`)."""


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    """Training loss of every step (mean over the global batch)."""
    val_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss by step; for a blend (data.sources), the sources' losses weighted by their weights."""
    source_val_losses: dict[int, dict[str, float]] = field(default_factory=dict)
    """With data.sources: each source's validation loss by step."""
    grad_norms: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    """Steps (1-based) whose update was skipped for a non-finite loss or gradient norm."""
    rollbacks: list[tuple[int, int]] = field(default_factory=list)
    """(step of the loss spike, step of the checkpoint reloaded), 1-based."""
    steps_done: int = 0
    stopped_early: bool = False
    trainer: Trainer | None = None
    speed: Speed | None = None
    """The logging rank's summary speed (`Reporter.speed`); None elsewhere or before any step logged."""
    collections: int = 0
    """Python garbage collections the loop ran on its schedule (training.gc_interval)."""


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
    fp8_weight_cache: Float8WeightCache | None = None
    """The float8 layers' weight casts kept for a step (Config.caches_fp8_weights), opened by train_step."""


def layer_ranges(config: Config) -> list[tuple[int, int]]:
    """Every pipeline chunk's [first, last) layers under parallel.pipeline_balance."""
    p, m = config.parallel, config.model
    ends = end_layer_costs(
        p.pipeline_balance, per_layer_params=count_parameters(m)["per_layer"], hidden_size=m.hidden_size,
        vocab_size=m.vocab_size, seq_len=config.data.seq_len,
    )  # fmt: skip
    return chunk_layer_ranges(m.num_layers, p.pp_size, p.num_model_chunks, ends)


def build(config: Config, mesh: Mesh, device: torch.device) -> Trainer:
    """The model chunks of this rank, their gradient synchronizers, the optimizer and the schedule."""
    if config.optimizer.offload_fraction == "auto":
        config = _resolve_offload(config, mesh, device)
    p, t = config.parallel, config.training
    ranges = layer_ranges(config)
    num_virtual_stages = len(ranges)
    if t.attention_backend == "fa4":
        check_fa4_device(device)
    if t.mlp_backend == "quack":
        check_quack_device(device)
        quack_kernels()  # fail now, with what to install, rather than inside the first compiled step
    if device.type == "cuda":
        use_attention_backend(t.attention_backend)
    if t.fp8:
        check_fp8_device(device, t.fp8)
    notice = fp8_notice(t)
    if notice and mesh.rank == 0:
        print(notice, flush=True)
    fp8_weight_cache = None
    if t.fp8 and config.caches_fp8_weights:
        fp8_weight_cache = Float8WeightCache(t.fp8, compiled=t.compile)
    tp = TPContext(
        mesh.tp_group,
        p.sequence_parallel,
        recompute=t.recompute,
        overlap_comm=p.overlap_tp_comm,
        fp8=t.fp8 or None,
        fp8_output_layer=t.fp8_output_layer,
        fp8_weight_cache=fp8_weight_cache,
        context=ContextParallel(mesh.cp_group, p.cp_attention) if mesh.cp_size > 1 else None,
        weight_grads=WeightGradQueue() if p.pipeline_schedule in SPLIT_BACKWARD else None,
        mlp_backend=t.mlp_backend,
    )
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
            has_head=c == num_virtual_stages - 1,
            compiled=t.compile,
        )
        for c in chunks_of_rank(mesh.pp_rank, p.pp_size, p.num_model_chunks, p.pipeline_schedule in V_SHAPED)
    }
    tied_across_stages = config.model.tie_embeddings and p.pp_size > 1
    direct = config.direct_grads  # alone, one micro-batch a step: no fp32 gradient buffers
    grad_syncs = {
        c: GradSync(
            list(chunk.parameters()),
            # cp ranks hold the same weights, each with the gradient of its own tokens: averaged like dp.
            dp_group=mesh.dp_cp_group,
            bucket_mb=p.dp_bucket_mb,
            zero=p.zero,
            solo=[chunk.embed_tokens.weight] if tied_across_stages and hasattr(chunk, "embed_tokens") else [],
            units=[[q for m in unit for q in m.parameters()] for unit in chunk.units()],
            fp8_gather=p.zero_fp8_gather,
            direct=direct,
        )
        for c, chunk in chunks.items()
    }
    for c, chunk in chunks.items():
        if p.zero >= 3:
            chunk.set_unit_hooks(ParamGather(grad_syncs[c], chunk.units()))
        elif p.zero and mesh.dp_cp_size > 1:
            chunk.set_unit_hooks(WaitForGather(grad_syncs[c], chunk.units()))  # all-gather overlaps forward
    syncs = [grad_syncs[c] for c in sorted(grad_syncs)]

    def owned_grads() -> list[torch.Tensor]:
        return [g for s in syncs for g in s.owned_grads()]

    optimizer = Optimizer(
        [r for s in syncs for r in s.owned_ranges()],
        config.optimizer,
        mesh=mesh,
        max_steps=t.max_steps,
        zero=p.zero,
        names={param: name for chunk in chunks.values() for name, param in chunk.named_parameters()},
        grads=owned_grads if direct else owned_grads(),
        weights=[w for s in syncs for w in s.owned_weights()],
        offload=config.optimizer.offload,
    )
    seq_local = config.data.seq_len // (p.tp_size if p.sequence_parallel else 1) // p.cp_size
    executor = PipelineExecutor(
        chunks,
        mesh,
        num_virtual_stages=num_virtual_stages,
        boundary_shape=(t.micro_batch_size, seq_local, config.model.hidden_size),
        dtype=DTYPES[t.dtype],
        device=device,
        scatter_gather=p.scatter_gather,
        grad_syncs=grad_syncs,
        document_eos_id=_document_eos_id(config),
        reset_positions=config.data.reset_position_ids,
    )
    schedule = build_schedule(p.pipeline_schedule, p.pp_size, p.num_model_chunks, config.num_microbatches)
    connect_neighbours(mesh, device)
    return Trainer(
        chunks, grad_syncs, optimizer, executor, schedule[mesh.pp_rank], config, mesh, fp8_weight_cache
    )


def _resolve_offload(config: Config, mesh: Mesh, device: torch.device) -> Config:
    """optimizer.offload_fraction 'auto' as the share plan.fit.resolve_offload picks for this device's memory
    (on CPU, the host's memory shared by this run's ranks); every rank of one GPU kind picks the same."""
    from threefold.plan.fit import device_memory, resolve_offload

    resolved = resolve_offload(config, device_memory(device, ranks=mesh.world_size))
    if mesh.rank == 0 and config.optimizer.offload:
        share = resolved.optimizer.offload_fraction
        print(f"optimizer.offload_fraction 'auto': {share} of the optimizer state on the host", flush=True)
    return resolved


FP8_MIN_CAPABILITY = (8, 9)
"""Float8 tensor cores arrive with Ada (8.9) and Hopper (9.0)."""


def check_fp8_device(device: torch.device, recipe: str) -> None:
    """training.fp8 needs a CUDA device with float8 tensor cores; ValueError naming the device otherwise."""
    if device.type != "cuda":
        raise ValueError(f"training.fp8 = {recipe!r} needs a CUDA GPU; this rank runs on {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"training.fp8 = {recipe!r} needs compute capability >= 8.9 (Ada, Hopper or newer); {name} "
            f"({device}) has {capability[0]}.{capability[1]}"
        )


def fp8_notice(training: TrainingConfig) -> str | None:
    """What rank 0 says when training.fp8 is on without training.compile: float8 then runs, but its casts
    are torch's separate kernels and the step measured no faster than bf16's (docs/benchmarks.md, issue 18's
    twenty-ninth session); None otherwise."""
    if not training.fp8 or training.compile:
        return None
    return (
        f"training.fp8 = {training.fp8!r} with training.compile = false: float8 runs, but uncompiled its "
        "casts are separate kernels and the step measured no faster than bf16's; set training.compile = true "
        "for float8's speed"
    )


def _document_eos_id(config: Config) -> int | None:
    """The EOS id that separates the dataset's documents when document masking is on, else None."""
    if not config.data.document_masking:
        return None
    # A blend's sources share their EOS id (threefold.data.blend.check_compatible).
    return int(read_meta(config.data.datasets()[0].path)["eos_token_id"])


def train_loader(config: Config, mesh: Mesh, train_set: TokenDataset | None = None) -> SampleLoader:
    """This data-parallel rank's batches of the training split (opened here unless given); a blend's
    (data.sources) when the config names one."""
    t = config.training
    if config.data.sources and train_set is None:
        sources = [
            BlendSource(s.label, TokenDataset(s.path, "train", config.data.seq_len), s.weight)
            for s in config.data.sources
        ]
        return BlendLoader(
            sources,
            micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size,
            dp_rank=mesh.dp_rank,
            dp_size=mesh.dp_size,
            seed=t.seed,
        )
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


def context_shard(batches: list[Batch], mesh: Mesh) -> list[Batch]:
    """This cp rank's chunks of every sample (all of them without context parallelism)."""
    if mesh.cp_size == 1:
        return batches
    return [
        (split_sequence(x, mesh.cp_rank, mesh.cp_size), split_sequence(y, mesh.cp_rank, mesh.cp_size))
        for x, y in batches
    ]


def _replica_sum(value: torch.Tensor, mesh: Mesh, what: str) -> torch.Tensor:
    """Sum over the dp x cp ranks, the ranks holding the same weights (in place)."""
    if mesh.dp_cp_size > 1:
        with track.collective(mesh.dp_cp_group, f"all_reduce({what})"):
            dist.all_reduce(value, group=mesh.dp_cp_group)
    return value


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
    weight = trainer.chunks[holder].embed_tokens.weight
    # Both holders keep the weight in a bucket of its own, so their ranges (ZeRO) are the same.
    for grad in [g for p, g in trainer.optimizer.grads() if p is weight]:
        with track.collective(group, "all_reduce(tied embedding grad)"):
            dist.all_reduce(grad, group=group)


@dataclass(frozen=True)
class PendingStats:
    """One step's figures as `train_step` returns them: device tensors, so that the step does not wait
    for the device; the loop reads them on the host once per log interval."""

    step: int
    """0-based."""
    loss: torch.Tensor
    """Mean training loss over the global batch, ()."""
    grad_norm: torch.Tensor
    lr: float
    skipped: torch.Tensor
    """Set, identically on every rank, when the loss or the norm is not finite and the update was not
    applied."""
    queued: Any = None
    """The reporter's clock mark taken once the step's work was queued (`Reporter.mark`): where its log
    window ends."""
    host_copy: tuple[torch.Tensor, torch.cuda.Event] | None = None
    """On CUDA: loss, norm and skip flag (float64) in page-locked host memory, and the event after which
    they are valid: copied as the step's last work (`copy_to_host`)."""

    def copy_to_host(self) -> PendingStats:
        """Queue the figures' copy to the host behind this step's work, so that `read` waits for this step
        alone. A plain read (`float(loss)`) queues its copy behind everything queued by then: read once
        the next step is queued, it waited for that step too, and the device then sat idle until the host
        had logged and queued another (at log_interval 1, every step)."""
        if not self.loss.is_cuda:
            return self
        figures = torch.stack([t.to(torch.float64) for t in (self.loss, self.grad_norm, self.skipped)])
        copied = torch.cuda.Event()
        on_host = figures.to("cpu", non_blocking=True)  # into page-locked memory: queued, not waited on
        copied.record()
        return replace(self, host_copy=(on_host, copied))

    def read(self) -> StepStats:
        """The same figures on the host (waits for this step's work on the device)."""
        if self.host_copy is None:
            return StepStats(self.step, float(self.loss), float(self.grad_norm), self.lr, bool(self.skipped))
        on_host, copied = self.host_copy
        copied.synchronize()
        loss, norm, skipped = on_host.tolist()
        return StepStats(self.step, loss, norm, self.lr, bool(skipped))


def train_step(
    trainer: Trainer, micro_batches: list[Batch], step: int, *, spans: list[torch.Tensor] | None = None
) -> PendingStats:
    """One optimizer step over this rank's micro-batches; `spans`, their document boundaries where FA4
    needs them (PipelineExecutor.document_spans of the host batches; found from `micro_batches` if not
    given)."""
    mesh = trainer.mesh
    num_microbatches = len(micro_batches)
    if num_microbatches > 1 and any(s.direct for s in trainer.grad_syncs.values()):
        # autograd would sum the micro-batches' gradients in the compute dtype, not in fp32
        raise ValueError(f"direct gradients take one micro-batch a step, got {num_microbatches}")
    cache = trainer.fp8_weight_cache
    with cache.step() if cache is not None else contextlib.nullcontext():  # weights cast once, then read
        loss_sum = trainer.executor.run(
            trainer.schedule, micro_batches, loss_scale=1.0 / num_microbatches, train=True, spans=spans
        )
    track.set_action("gradient sync")
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.finish()
    all_reduce_tp_replicated_grads(trainer.optimizer.grads(), mesh.tp_group)
    _sync_tied_embedding(trainer)
    # The loss is reduced before the update so that a non-finite loss can veto it on every rank.
    track.set_action("loss reduction")
    loss = _pipeline_sum(loss_sum / (num_microbatches * mesh.dp_cp_size), mesh)
    loss = _replica_sum(loss, mesh, "loss")
    bad_loss = ~torch.isfinite(loss)
    track.set_action("optimizer step")
    wait_params(trainer)  # a parameter no forward used may still be arriving from the last step
    norm, lr = trainer.optimizer.step(step, found_inf=bad_loss)
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.gather_params()
        grad_sync.reset()
    return PendingStats(step, loss, norm, lr, skipped=bad_loss | ~torch.isfinite(norm)).copy_to_host()


@torch.no_grad()
def evaluate(trainer: Trainer, batches: list[Batch]) -> float:
    """The mean loss per sequence over every data-parallel rank's `batches` (of any sizes), on every rank."""
    mesh, p = trainer.mesh, trainer.config.parallel
    for chunk in trainer.chunks.values():
        chunk.eval()
    v_shape = p.pipeline_schedule in V_SHAPED
    steps = forward_only(mesh.pp_rank, p.pp_size, p.num_model_chunks, len(batches), v_shape)
    actions = add_communication(steps, mesh.pp_rank, p.pp_size, p.num_model_chunks, v_shape)
    sizes = [x.shape[0] for x, _ in batches]
    total = trainer.executor.run(actions, batches, loss_scale=1.0, train=False, loss_weights=sizes)
    for chunk in trainer.chunks.values():
        chunk.train()
    # [summed loss, sequences] over the dp x cp ranks: the dp shares may differ by one sequence, and each
    # cp rank's loss is the mean over its part of the same sequences (equal parts), so the ratio is the
    # mean over every token.
    total = torch.stack([_pipeline_sum(total, mesh), total.new_tensor(float(sum(sizes)))])
    total = _replica_sum(total, mesh, "validation loss")
    with track.waiting_for(mesh.dp_group, "host sync (validation loss)"):
        return float(total[0] / total[1])


def _to_device(batches: list[Batch], device: torch.device) -> list[Batch]:
    """Host micro-batches onto `device`, queued without the host waiting for the device (`to_device`):
    with several micro-batches a step, pageable copies would make it wait every step."""
    return [(to_device(x, device), to_device(y, device)) for x, y in batches]


@dataclass(frozen=True)
class Cadence:
    """When each duty of the loop is due after `done` steps; `end`: the run ends after this step (its last
    planned step, or a stop). training.eval_interval 0 turns evaluation off; saving needs checkpoint.dir,
    and checkpoint.interval 0 saves only at the end."""

    config: Config

    def last(self, done: int) -> bool:
        return done == self.config.training.max_steps

    def out_of_time(self, started: float) -> bool:
        limit = self.config.training.max_minutes
        return limit > 0 and (time.perf_counter() - started) / 60 >= limit

    def log(self, done: int, end: bool) -> bool:
        return done % self.config.logging.log_interval == 0 or end

    def log_late(self, done: int, end: bool) -> bool:
        """Whether a log due now may be read once the next step is queued (`_Duties.defer_log`): not at
        the end, not before another duty of this step, not when a loss spike must roll back before the
        next step (reliability.spike_rollback)."""
        others = (self.evaluate, self.sample, self.save)
        return not (end or self.config.reliability.spike_rollback or any(d(done, end) for d in others))

    def evaluate(self, done: int, end: bool) -> bool:
        every = self.config.training.eval_interval
        return every > 0 and (done % every == 0 or end)

    def sample(self, done: int, end: bool) -> bool:
        every = self.config.logging.sample_every
        return every > 0 and (done % every == 0 or end)

    def save(self, done: int, end: bool) -> bool:
        every = self.config.checkpoint.interval
        return bool(self.config.checkpoint.dir) and ((every > 0 and done % every == 0) or end)


@dataclass
class _Duties:
    """The loop's periodic duties on one rank: log, evaluate, save, stop."""

    trainer: Trainer
    loader: SampleLoader
    val_batches: dict[str, list[Batch]]
    """Each dataset's validation batches, by source name (one entry without data.sources)."""
    guard: RunGuard
    checkpointer: Checkpointer | None
    reporter: Reporter
    result: TrainResult
    sampler: Sampler | None = None
    """Continues logging.sample_prompts every logging.sample_every steps (None: never)."""
    pending: list[PendingStats] = field(default_factory=list)
    """The steps since the last log, not yet read on the host."""
    late_log: bool = False
    """The last log interval is read after the next step is queued (`defer_log`)."""

    def defer_log(self, now: bool) -> None:
        """Log the interval now, or (`now` False) once the next step's work is queued, so that the device
        runs that step while the host waits for this one's figures and reports them. Read at once, the
        device sits idle from the end of this step until the host has logged and queued the next one:
        at log_interval 1, every step."""
        self.late_log = not now
        if now:
            self.log()

    def log(self) -> None:
        """The interval's one host sync (losses, norms, skip flags), then its report and its checks; a
        late log leaves the newest step, just queued, for the next interval.

        Raises NumericsError after too many consecutive skipped steps; rolls back from a loss spike.
        """
        interval = self.pending[:-1] if self.late_log else list(self.pending)
        self.late_log = False
        with track.waiting_for(None, "host sync (losses)"):
            synced = [s.read() for s in interval]
        del self.pending[: len(interval)]
        self.result.losses += [s.loss for s in synced]
        self.result.grad_norms += [s.grad_norm for s in synced]
        self.result.skipped += [s.step + 1 for s in synced if s.skipped]
        self.reporter.interval(synced, interval[-1].queued if interval else None)
        if isinstance(self.loader, BlendLoader) and synced:
            # Logged before the spike check: the loader stands exactly at the interval's last step.
            per_source = self.loader.samples_per_source()
            self.reporter.data_mix(synced[-1].step + 1, per_source)
        spike_step = self.guard.interval(synced, self.reporter.note)
        if spike_step is not None:
            with self.reporter.pause():
                _roll_back(self.trainer, self.checkpointer, spike_step, self.result, self.reporter)

    def evaluate(self, done: int) -> None:
        track.set_action("evaluation")
        with self.reporter.pause():
            losses = {name: evaluate(self.trainer, batches) for name, batches in self.val_batches.items()}
        data = self.trainer.config.data
        if data.sources:
            val = val_loss(losses, {s.label: s.weight for s in data.sources})
            self.result.source_val_losses[done] = losses
        else:
            (val,) = losses.values()
        self.result.val_losses[done] = val
        self.reporter.validation(done, val, losses if data.sources else None)

    def sample(self, done: int) -> None:
        """Generate from the prompts with the weights of step `done`, on every rank (each stage runs its
        layers). The global RNG states are restored after, so that a run's losses do not depend on
        whether it samples."""
        assert self.sampler is not None  # Cadence.sample is never due without one
        track.set_action("sample")
        trainer = self.trainer
        device = next(trainer.chunks[min(trainer.chunks)].parameters()).device
        for grad_sync in trainer.grad_syncs.values():
            # ZeRO: this step's updated parameters have landed; ZeRO-3 gathers them whole (as a checkpoint
            # save does), and the next training forward frees each unit again as it leaves it.
            grad_sync.quiesce()
        v_shape = trainer.config.parallel.pipeline_schedule in V_SHAPED
        with self.reporter.pause(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for chunk in trainer.chunks.values():
                chunk.eval()
            try:
                samples = self.sampler.sample(trainer.chunks, trainer.mesh, v_shape=v_shape)
            finally:
                for chunk in trainer.chunks.values():
                    chunk.train()
        self.reporter.samples(done, [(s.prompt, s.completion) for s in samples])

    def save(self, done: int) -> None:
        assert self.checkpointer is not None  # Cadence.save is never due without one
        track.set_action("checkpoint")
        with self.reporter.pause():
            began = time.perf_counter()
            path = self.checkpointer.save(
                self.trainer, step=done, consumed_samples=self.loader.consumed_samples
            )
            blocked = time.perf_counter() - began
        self.reporter.checkpoint(done, path, blocked)

    def stop(self, done: int, stop: StopRequest, interrupted: bool) -> None:
        why = (
            f"interrupted by {stop.signal_name or 'a signal to another rank'}"
            if interrupted
            else "time limit"
        )
        if self.trainer.mesh.rank == 0:
            self.guard.events.write("stopped", step=done, reason=why)
        self.reporter.note(f"stopped after step {done} ({why})")


def _validation_batches(config: Config, mesh: Mesh, device: torch.device) -> dict[str, list[Batch]]:
    """This data-parallel rank's share of each dataset's validation batches (training.eval_sequences of
    each), on `device`, by source name."""
    out = {}
    for source in config.data.datasets():
        try:
            batches = eval_batches(
                TokenDataset(source.path, "val", config.data.seq_len),
                num_sequences=config.training.eval_sequences,
                micro_batch_size=config.training.micro_batch_size,
                dp_rank=mesh.dp_rank,
                dp_size=mesh.dp_size,
            )
        except ValueError as e:
            if not config.data.sources:
                raise
            raise ValueError(f"data source {source.label!r}: {e}") from None
        out[source.label] = _to_device(context_shard(batches, mesh), device)
    return out


def train(
    config: Config, mesh: Mesh, device: torch.device, *, faults: FaultPlan | None = None
) -> TrainResult:
    """Run the training loop on this rank; every rank of the mesh calls it.

    `faults` (test-only, see threefold.reliability.faults) injects crashes, hangs, signals and NaNs.
    """
    control = ControlChannel()
    with hold_run_directories(config, control, mesh.rank):
        return _train(config, mesh, device, control, faults)


def _train(
    config: Config, mesh: Mesh, device: torch.device, control: ControlChannel, faults: FaultPlan | None
) -> TrainResult:
    t, ckpt = config.training, config.checkpoint
    check_data(config, control, mesh.rank)
    # Before the model is built: a prompt too long for the context fails fast, on every rank alike.
    sampler = Sampler.for_run(config) if config.logging.sample_every > 0 else None
    trainer = build(config, mesh, device)
    loader = train_loader(config, mesh)
    val_batches = _validation_batches(config, mesh, device)
    guard = RunGuard(config, mesh, control, faults=faults)
    start = resume(trainer, loader, control, guard.events)
    start_step = start.step
    if mesh.rank == 0 and start.path is not None:
        print(start.describe(t.max_steps), flush=True)  # whatever logging.progress says
    checkpointer = (
        Checkpointer(ckpt.dir, keep_last=ckpt.keep_last, asynchronous=ckpt.asynchronous) if ckpt.dir else None
    )
    reporter = Reporter(config, mesh, device, enabled=mesh.rank == 0, start_step=start_step)
    result = TrainResult(trainer=trainer, steps_done=start_step)
    due = Cadence(config)
    duties = _Duties(trainer, loader, val_batches, guard, checkpointer, reporter, result, sampler)
    started = time.perf_counter()
    collector = CollectorSchedule(t.gc_interval)
    with StopRequest(config.reliability.preemption_deadline) as stop, reporter, guard, collector:
        if start_step == 0 and due.evaluate(0, end=False):  # the starting point of the validation curve
            duties.evaluate(0)
        for step in range(start_step, t.max_steps):
            guard.begin_step(step, trainer)
            batches = context_shard(loader.next_batch(), mesh)
            spans = trainer.executor.document_spans(batches)  # from the host's token ids: no wait
            pending = train_step(trainer, _to_device(batches, device), step, spans=spans)
            duties.pending.append(replace(pending, queued=reporter.mark()))
            # Every step: a signal reaching any rank, or the time limit, stops all of them after this step.
            interrupted, late = guard.end_step(
                stop_requested=stop.requested, out_of_time=due.out_of_time(started)
            )
            if duties.late_log:  # the last interval, while the device runs this step
                duties.log()
            done = result.steps_done = step + 1
            result.stopped_early = (interrupted or late) and not due.last(done)
            end = due.last(done) or result.stopped_early
            if due.log(done, end):
                duties.defer_log(now=device.type not in QUEUED_DEVICES or not due.log_late(done, end))
            if due.evaluate(done, end):
                duties.evaluate(done)
            if due.sample(done, end):
                duties.sample(done)
            if due.save(done, end):
                duties.save(done)
            if collector.due(done) and not end:
                track.set_action("garbage collection")
                collector.collect()
            if result.stopped_early:
                duties.stop(done, stop, interrupted)
                break
        if checkpointer:
            checkpointer.finish(trainer)  # an asynchronous save still in flight
        result.speed = reporter.speed() if reporter.enabled else None
        result.collections = collector.collections
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.quiesce()  # the parameters whole (ZeRO-3) for whoever reads them next
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
