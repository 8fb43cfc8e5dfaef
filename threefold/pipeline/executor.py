"""The executor: runs one rank's action list (threefold.pipeline.schedules) on its model chunks.

Shapes: a boundary tensor is (b, s_, h), s_ = s/t under sequence parallelism else s, in the compute
dtype. With scatter/gather (tp > 1, no sequence parallelism) each TP rank sends only its 1/t slice of the
flattened tensor and the receiving stage all-gathers it over its TP group: the TP ranks of a stage hold
identical boundary tensors, so the slow inter-stage link carries each byte once.

Split backward (zero-bubble schedules, lists with W actions): B runs the chunk's backward while the
chunks' WeightGradQueue captures, so the linear layers queue their weight gradients instead of computing
them (threefold.parallel.weight_grad); W runs that queue. The data-parallel reduction of a chunk's
gradients is armed for its last B (norms, embeddings) and its last W (the linear layers), so every
parameter is counted on its final accumulation of the step. Sends are then eager: posted, not waited for
until the step ends (the simulator models this), with activations and gradients on separate tags so each
kind keeps its own order between two ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.autograd import Variable

from threefold.data.dataset import to_device
from threefold.model.attention import document_ids, document_spans
from threefold.model.fa4 import fa4_enabled
from threefold.model.transformer import Transformer
from threefold.parallel import track
from threefold.parallel.comm import all_gather_flat
from threefold.parallel.data_parallel import GradSync
from threefold.parallel.mesh import Mesh
from threefold.parallel.weight_grad import WeightWork, run
from threefold.pipeline.schedules import Action, Kind, batches

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _StepState:
    """Tensors alive during one step, keyed by (chunk, micro-batch)."""

    loss_sum: torch.Tensor
    inputs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    outputs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    output_grads: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    input_grads: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    weight_work: dict[tuple[int, int], WeightWork] = field(default_factory=dict)
    """The weight gradients each B put off, for its W."""
    sends: list[tuple[dist.Work, torch.Tensor]] = field(default_factory=list)
    """Eager sends in flight with the buffers they read (split backward)."""
    documents: dict[int, torch.Tensor] = field(default_factory=dict)
    """Each micro-batch's document ids (document masking), found once for all of this rank's chunks."""
    spans: list[torch.Tensor] | None = None
    """Each micro-batch's document boundaries on the device (document masking through FA4)."""


def _free(t: torch.Tensor) -> None:
    """Drop a sent activation's storage; its autograd graph (all backward needs) stays alive."""
    if t._base is None:  # a view would share storage with something still in use
        t.data = torch.empty((1,), dtype=t.dtype, device=t.device)


def _backward(output: torch.Tensor, grad: torch.Tensor) -> None:
    # The engine directly: torch.autograd.backward would compare grad's shape with the freed output's.
    Variable._execution_engine.run_backward(
        (output,), (grad,), False, False, (), True, True
    )  # keep_graph, create_graph, inputs, allow_unreachable, accumulate_grad


def connect_neighbours(mesh: Mesh, device: torch.device) -> None:
    """Open the point-to-point links to both pipeline neighbours, all ranks at once.

    NCCL sets up a link between two ranks at their first exchange, and the setup blocks until the peer
    joins. The schedules' first transfers form a ring (the last stage feeds the first with interleaving),
    so lazy setup could wait in a circle; one batch in which every rank exchanges with both neighbours
    completes everywhere.
    """
    if mesh.pp_size == 1:
        return
    prev_rank = mesh.rank_at(
        pp_rank=(mesh.pp_rank - 1) % mesh.pp_size, dp_rank=mesh.dp_rank, tp_rank=mesh.tp_rank
    )
    next_rank = mesh.rank_at(
        pp_rank=(mesh.pp_rank + 1) % mesh.pp_size, dp_rank=mesh.dp_rank, tp_rank=mesh.tp_rank
    )
    buffers = [torch.zeros(1, device=device) for _ in range(4)]
    ops = [
        dist.P2POp(dist.isend, buffers[0], next_rank),
        dist.P2POp(dist.irecv, buffers[1], prev_rank),
        dist.P2POp(dist.isend, buffers[2], prev_rank),
        dist.P2POp(dist.irecv, buffers[3], next_rank),
    ]
    with track.transfer([next_rank, prev_rank, prev_rank, next_rank]):
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PipelineExecutor:
    """Runs action lists for this rank's chunks: {global chunk index: model chunk}."""

    def __init__(
        self,
        chunks: dict[int, Transformer],
        mesh: Mesh,
        *,
        num_virtual_stages: int,
        boundary_shape: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        scatter_gather: bool,
        grad_syncs: dict[int, GradSync] | None = None,
        document_eos_id: int | None = None,
        reset_positions: bool = False,
    ) -> None:
        """`document_eos_id` turns document masking on: every chunk derives the documents of a micro-batch
        from its input tokens (split after this EOS id), so no stage needs them sent; `reset_positions`
        restarts positions at each document."""
        self.chunks = chunks
        self.mesh = mesh
        self.last_chunk = num_virtual_stages - 1
        self.boundary_shape = boundary_shape
        self.dtype = dtype
        self.device = device
        sequence_parallel = next(iter(chunks.values())).tp.sequence_parallel
        self.scatter = scatter_gather and mesh.tp_size > 1 and not sequence_parallel
        self.grad_syncs = grad_syncs or {}
        self._batch_sizes: list[int] = []  # of the micro-batches run() is running
        self._loss_weights: list[int] | None = None
        self.document_eos_id = document_eos_id
        self.reset_positions = reset_positions
        self.weight_grads = next(iter(chunks.values())).tp.weight_grads

    def run(
        self,
        actions: list[Action],
        micro_batches: list[Batch],
        *,
        loss_scale: float,
        train: bool,
        loss_weights: list[int] | None = None,
        spans: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Execute `actions`; returns the sum of the unscaled micro-batch losses (zero off the last stage),
        each times its entry in `loss_weights` when given. Micro-batches may differ in size (evaluation's
        last one): what crosses a stage boundary is shaped by the micro-batch it belongs to. `spans`: the
        micro-batches' `document_spans`, found here when not given (see there)."""
        state = _StepState(loss_sum=torch.zeros((), device=self.device))
        if spans is None:
            spans = self.document_spans(micro_batches)
        if spans is not None:
            state.spans = [self._spans_on_device(s) for s in spans]
        self._batch_sizes = [x.shape[0] for x, _ in micro_batches]
        self._loss_weights = loss_weights
        split = any(a.kind is Kind.W for a in actions)
        assert not split or self.weight_grads is not None, "a split backward needs the layers' queue"
        last = {}  # (kind, chunk) -> micro-batch of the action that arms the chunk's gradient sync
        for a in actions:
            if a.kind in (Kind.B, Kind.W):
                last[(a.kind, a.chunk)] = a.microbatch
        for group in batches(actions):
            track.set_action(group)
            a = group[0]
            if a.kind is Kind.F:
                self._forward(a, micro_batches, state, loss_scale, train)
            elif a.kind is Kind.B:
                self._backward(a, state, is_last=last[(Kind.B, a.chunk)] == a.microbatch, split=split)
            elif a.kind is Kind.W:
                self._arm_sync(a.chunk, last[(Kind.W, a.chunk)] == a.microbatch)
                run(state.weight_work.pop((a.chunk, a.microbatch)))
            else:
                self._transfer(group, state, eager=split)
        for work, _ in state.sends:
            work.wait()
        assert not state.outputs and not state.inputs, "every forward met its backward"
        assert not state.weight_work, "every B met its W"
        return state.loss_sum

    def document_spans(self, micro_batches: list[Batch]) -> list[torch.Tensor] | None:
        """Each micro-batch's document boundaries (threefold.model.attention.document_spans), where its
        tokens are, when attention runs through FA4's variable-length kernels (document masking with FA4,
        no context parallelism), else None. The training loop passes its host batches, so that
        nothing waits; from device tensors (evaluation, the bench's staged batches) the host waits for the
        device to count the documents."""
        context = next(iter(self.chunks.values())).tp.context
        if self.document_eos_id is None or not fa4_enabled() or context is not None:
            return None
        return [document_spans(x, self.document_eos_id) for x, _ in micro_batches]

    def _spans_on_device(self, spans: torch.Tensor) -> torch.Tensor:
        spans = to_device(spans, self.device)
        # Their count changes from one micro-batch to the next: one compiled graph for every count.
        torch._dynamo.maybe_mark_dynamic(spans, 0)
        return spans

    def _forward(
        self, a: Action, micro_batches: list[Batch], state: _StepState, loss_scale: float, train: bool
    ) -> None:
        key = (a.chunk, a.microbatch)
        inputs, targets = micro_batches[a.microbatch]
        x = inputs if a.chunk == 0 else state.inputs[key]
        model = self.chunks[a.chunk]
        docs = self._documents(a.microbatch, inputs, model, state)
        spans = None if state.spans is None else state.spans[a.microbatch]
        if a.chunk == self.last_chunk:
            loss = model(x, targets, doc_ids=docs, doc_spans=spans, reset_positions=self.reset_positions)
            weight = 1 if self._loss_weights is None else self._loss_weights[a.microbatch]
            state.loss_sum += loss.detach() * weight
            if train:
                state.outputs[key] = loss * loss_scale
        else:
            state.outputs[key] = model(x, doc_ids=docs, doc_spans=spans, reset_positions=self.reset_positions)
            if a.chunk + 1 in self.chunks:  # the tip of a V: the next chunk is here, no transfer
                out = state.outputs[key] if train else state.outputs.pop(key)
                state.inputs[(a.chunk + 1, a.microbatch)] = out.detach().requires_grad_(train)
        if not train:
            state.inputs.pop(key, None)

    def _documents(
        self, microbatch: int, inputs: torch.Tensor, model: Transformer, state: _StepState
    ) -> torch.Tensor | None:
        """The document ids (b, s) of a micro-batch's whole sequence, None without document masking. Under
        context parallelism the ids count the EOS tokens of every earlier chunk, so the cp ranks gather the
        token ids first: once per micro-batch, in the same order on every cp rank (the same schedule)."""
        if self.document_eos_id is None:
            return None
        if microbatch not in state.documents:
            context = model.tp.context
            whole = inputs if context is None else context.gather(inputs)
            state.documents[microbatch] = document_ids(whole, self.document_eos_id)
        return state.documents[microbatch]

    def _arm_sync(self, chunk: int, is_last: bool) -> None:
        if chunk in self.grad_syncs:
            # Data-parallel reductions start during the chunk's last backward of the step, not before.
            self.grad_syncs[chunk].sync_this_backward = is_last

    def _backward(self, a: Action, state: _StepState, *, is_last: bool, split: bool) -> None:
        key = (a.chunk, a.microbatch)
        self._arm_sync(a.chunk, is_last)
        output = state.outputs.pop(key)
        if split:
            assert self.weight_grads is not None
            with self.weight_grads.capture() as work:
                self._run_backward(a, output, state)
            state.weight_work[key] = work
        else:
            self._run_backward(a, output, state)
        if a.chunk > 0:
            grad = state.inputs.pop(key).grad
            assert grad is not None, "a received activation always feeds the chunk's output"
            if a.chunk - 1 in self.chunks:  # the tip of a V: hand the gradient over in place
                state.output_grads[(a.chunk - 1, a.microbatch)] = grad
            else:
                state.input_grads[key] = grad

    def _run_backward(self, a: Action, output: torch.Tensor, state: _StepState) -> None:
        if a.chunk == self.last_chunk:
            output.backward()
        else:
            _backward(output, state.output_grads.pop((a.chunk, a.microbatch)))

    def _peer(self, pp_rank: int) -> int:
        return self.mesh.rank_at(pp_rank=pp_rank, dp_rank=self.mesh.dp_rank, tp_rank=self.mesh.tp_rank)

    def _wire_shape(self, microbatch: int) -> tuple[int, int, int]:
        _, s, h = self.boundary_shape
        return self._batch_sizes[microbatch], s, h

    def _wire_numel(self, microbatch: int) -> int:
        b, s, h = self._wire_shape(microbatch)
        return b * s * h // (self.mesh.tp_size if self.scatter else 1)

    def _outgoing(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.detach().reshape(-1)
        if self.scatter:
            n = flat.numel() // self.mesh.tp_size
            flat = flat[self.mesh.tp_rank * n : (self.mesh.tp_rank + 1) * n]
        return flat.contiguous()

    def _incoming(self, wire: torch.Tensor, microbatch: int) -> torch.Tensor:
        if self.scatter:
            full = torch.empty(wire.numel() * self.mesh.tp_size, dtype=wire.dtype, device=wire.device)
            with track.collective(self.mesh.tp_group, "all_gather(boundary)"):
                all_gather_flat(full, wire, group=self.mesh.tp_group)
            wire = full
        return wire.view(self._wire_shape(microbatch))

    def _transfer(self, group: list[Action], state: _StepState, *, eager: bool) -> None:
        ops, received, sent, peers, wires = [], [], [], [], []
        for a in group:
            key = (a.chunk, a.microbatch)
            assert a.peer is not None  # every transfer names its peer
            peer = self._peer(a.peer)
            peers.append(peer)
            # Eager sends keep each kind in order on its own tag (the simulator's model).
            tag = 1 if eager and a.kind in (Kind.SEND_B, Kind.RECV_B) else 0
            if a.kind in (Kind.SEND_F, Kind.SEND_B):
                source = state.outputs[key] if a.kind is Kind.SEND_F else state.input_grads.pop(key)
                wire = self._outgoing(source)
                ops.append(dist.P2POp(dist.isend, wire, peer, tag=tag))
                wires.append(wire)
                if a.kind is Kind.SEND_F:
                    sent.append(key)
            else:
                buffer = torch.empty(self._wire_numel(a.microbatch), dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buffer, peer, tag=tag))
                received.append((a, buffer))
        with track.transfer(peers):
            if eager:
                # The wire tensors own their data (a flat copy or view), so freeing the outputs below
                # leaves what the sends read alive until they complete.
                sends = [op for op in ops if op.op is dist.isend]
                if sends:
                    state.sends += zip(dist.batch_isend_irecv(sends), wires, strict=True)
                recvs = [op for op in ops if op.op is not dist.isend]
                for work in dist.batch_isend_irecv(recvs) if recvs else []:
                    work.wait()
            else:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
        for key in sent:
            if state.outputs[key].requires_grad:
                _free(state.outputs[key])  # sent: only its graph is needed until the backward
            else:
                del state.outputs[key]  # forward-only: nothing refers to the output any more
        for a, buffer in received:
            key = (a.chunk, a.microbatch)
            tensor = self._incoming(buffer, a.microbatch)
            if a.kind is Kind.RECV_F:
                state.inputs[key] = tensor.requires_grad_(torch.is_grad_enabled())
            else:
                state.output_grads[key] = tensor
