"""Data-parallel gradient reduction in buckets, overlapped with the backward pass, ZeRO stages 0-3.

Every parameter gets a `main_grad` (but with direct gradients, see GradSync): an fp32 view into a flat
bucket buffer. A post-accumulate hook moves each fresh `.grad` into `main_grad` (so bf16 training
accumulates micro-batches in fp32): the first micro-batch of a step copies, later ones add, so the
buffers never need zeroing. On the last micro-batch of a step, a bucket's reduction starts as soon as
all its parameters are done, and the rest of the backward pass overlaps with it. Gradients are
synchronized once per step.

Without ZeRO the reduction is an all-reduce: every data-parallel rank ends with the mean gradient.
With `zero=True` (ZeRO stage 1, the "distributed optimizer") each bucket is padded to a multiple of
d and reduce-scattered: data-parallel rank r ends with the mean gradient of the r-th 1/d of every
bucket, and only that part gets fp32 master weights and Adam moments (see optim.py). The parameters
then live in a flat buffer per bucket too, so that after the update one all-gather per bucket brings
every rank the new weights. Same bytes on the wire as an all-reduce (a ring all-reduce is a
reduce-scatter plus an all-gather); 12/d instead of 12 bytes of optimizer state per parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from threefold.parallel import track
from threefold.parallel.comm import all_gather_flat, reduce_scatter_flat
from threefold.parallel.fp8_gather import Float8Gather, gather_float8
from threefold.parallel.layers import num_tp_shards, pad_to_multiple, tp_replicas, tp_shard_index
from threefold.parallel.main_grad import into_main_grad, kernel_runs_on


class _Bucket:
    def __init__(
        self, params: list[nn.Parameter], device: torch.device, dp_rank: int, dp_size: int, zero: int
    ) -> None:
        self.params = params
        numel = sum(p.numel() for p in params)
        padded = pad_to_multiple(numel, dp_size) if zero else numel
        self.buffer = torch.zeros(padded, dtype=torch.float32, device=device)
        self.param_buffer: torch.Tensor | None = None
        if zero:
            dtypes = {p.dtype for p in params}
            if len(dtypes) != 1:
                have = sorted(map(str, dtypes))
                raise ValueError(f"a ZeRO bucket needs parameters of one dtype, got {have}")
            self.param_buffer = torch.zeros(padded, dtype=params[0].dtype, device=device)
        self.offsets: dict[nn.Parameter, int] = {}
        offset = 0
        for p in params:
            p.main_grad = self.buffer[offset : offset + p.numel()].view_as(p)  # type: ignore[attr-defined]
            if self.param_buffer is not None:
                flat = self.param_buffer[offset : offset + p.numel()]
                flat.copy_(p.data.reshape(-1))
                p.data = flat.view_as(p)  # the parameter now lives in the bucket's flat buffer
            self.offsets[p] = offset
            offset += p.numel()
        self.numel = numel
        shard = padded // dp_size
        self.shard = (dp_rank * shard, (dp_rank + 1) * shard) if zero else (0, padded)
        """The flat range of the buffer this rank reduces and updates (all of it without ZeRO)."""
        lo, hi = self.shard
        self.grad_shard: torch.Tensor | None = None
        """ZeRO-2/3: this rank's reduced part of the gradient, summed over the step's micro-batches."""
        self.param_shard: torch.Tensor | None = None
        """ZeRO-3: this rank's part of the parameters, the only copy kept between uses."""
        if zero >= 2:
            self.grad_shard = torch.zeros(hi - lo, dtype=torch.float32, device=device)
            free_storage(self.buffer)  # allocated again by the first gradient of a backward
        if zero >= 3:
            assert self.param_buffer is not None
            self.param_shard = self.param_buffer[lo:hi].clone()
            free_storage(self.param_buffer)  # gathered again just before each use
        self.ready: set[nn.Parameter] = set()
        """Parameters whose gradient arrived since the bucket's last reduction."""
        self.handle: dist.Work | None = None
        self.reduced_into: torch.Tensor | None = None
        """ZeRO-2/3: where the reduction in flight writes (grad_shard, or a scratch tensor added to it)."""
        self.shard_written = False
        """ZeRO-2/3: grad_shard holds part of this step's gradient (later reductions add to it)."""
        self.gather: dist.Work | Float8Gather | None = None
        """The parameter all-gather in flight (ZeRO), waited for before the parameters are used."""
        self.fp8_gather = False
        """ZeRO-3 with parallel.zero_fp8_gather: a bucket of float8 linears' weights, gathered as float8."""
        self.fp8_values = False
        """The full parameter buffer holds float8-rounded values (a float8 gather's): good for the float8
        GEMMs, not for reading the weights themselves (`GradSync.materialize` gathers those again)."""


def free_storage(t: torch.Tensor) -> None:
    """Release `t`'s memory while every view of it (a parameter, a main_grad) stays valid to refill."""
    t.untyped_storage().resize_(0)


def ensure_storage(t: torch.Tensor) -> bool:
    """Give `t` (a whole buffer) its memory back after `free_storage`; True if it had none (contents are
    then undefined)."""
    nbytes = t.numel() * t.element_size()
    if t.untyped_storage().size() == nbytes:
        return False
    t.untyped_storage().resize_(nbytes)
    return True


class GradSync:
    """Owns the fp32 gradient buffers of `params` and reduces them over `dp_group`.

    `zero` is the ZeRO stage (0-3; True means 1). Stage 1 is described above. Stage 2 reduce-scatters
    every bucket as soon as its gradients are complete in each backward (every micro-batch), adds the
    result into the bucket's fp32 `grad_shard`, and frees the full bucket: between the backward passes
    each rank holds only its 1/d of the gradient. Stage 3 also keeps only `param_shard`, 1/d of the
    parameters: `units` (forward order, one list of parameters per layer, see Transformer.units) then
    become the buckets, and a `ParamGather` (parallel/zero_params.py) all-gathers each unit around its
    forward and backward.

    `direct` (one process alone, one micro-batch per step: `Config.direct_grads`) keeps no fp32
    buffers: nothing is accumulated or reduced, so each parameter's compute-dtype `.grad` goes to the
    optimizer as autograd left it, which reads it in fp32 as it would have read the copy (the same
    values), and `reset` drops it. No gradient is moved, and the fp32 buffers' memory is free.

    `solo` parameters get a bucket of their own. With ZeRO a bucket's shard boundaries depend on what
    else is in it, so a parameter whose gradient is also summed across another group (the tied
    embedding, held by the first and the last pipeline stage) must sit at the same offsets in both.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        *,
        dp_group: ProcessGroup,
        bucket_mb: float,
        zero: int = 0,
        solo: list[nn.Parameter] | None = None,
        units: list[list[nn.Parameter]] | None = None,
        fp8_gather: bool = False,
        direct: bool = False,
    ) -> None:
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group)
        self.dp_rank = dist.get_rank(dp_group)
        self.zero = int(zero)
        if not 0 <= self.zero <= 3:
            raise ValueError(f"the ZeRO stage must be 0, 1, 2 or 3, got {zero}")
        if direct and (self.zero or self.dp_size > 1 or solo):
            raise ValueError(
                f"direct gradients need one data-parallel rank, no ZeRO and no solo parameters, got "
                f"dp_size {self.dp_size}, zero {self.zero}, {len(solo or [])} solo"
            )
        self.direct = direct
        self.sync_this_backward = True
        solo_ids = {id(p) for p in solo or []}
        # The buckets' order (backward's, last layer first): the norm sums the parameters in this order.
        self._direct = [p for p in reversed(params) if p.requires_grad] if direct else []
        trainable = set() if direct else {id(p) for p in params if p.requires_grad}  # what gets a bucket
        groups: list[list[nn.Parameter]] = [[p] for p in reversed(params) if id(p) in solo_ids & trainable]
        if self.zero >= 3:
            # One bucket per unit: what a layer's forward reads is gathered (and freed) together.
            assert units is not None, "ZeRO-3 gathers parameters by unit"
            seen = set(solo_ids)
            for unit in units:
                group = [p for p in unit if id(p) in trainable and id(p) not in seen]
                seen |= {id(p) for p in group}
                if fp8_gather:  # the float8 linears' weights in a bucket of their own, gathered as float8
                    groups += [[p for p in group if not _tensorwise(p)], [p for p in group if _tensorwise(p)]]
                else:
                    groups.append(group)
            assert trainable <= seen, "every parameter belongs to a unit"
            groups.reverse()  # last layer first, as backward produces them
        else:
            # Backward visits layers last-to-first, so fill buckets in reverse registration order.
            groups.append([])
            bucket_numel = max(1, int(bucket_mb * 2**20 / 4))
            size = 0
            for p in reversed(params):
                if id(p) in solo_ids or id(p) not in trainable:
                    continue
                if groups[-1] and size + p.numel() > bucket_numel:
                    groups.append([])
                    size = 0
                groups[-1].append(p)
                size += p.numel()
        ordered = [p for g in groups for p in g]
        device = ordered[0].device if ordered else torch.device("cpu")
        self.buckets = [_Bucket(g, device, self.dp_rank, self.dp_size, self.zero) for g in groups if g]
        for bucket in self.buckets:
            bucket.fp8_gather = fp8_gather and self.zero >= 3 and all(map(_tensorwise, bucket.params))
        self._bucket_of: dict[nn.Parameter, _Bucket] = {p: b for b in self.buckets for p in b.params}
        self._written: set[nn.Parameter] = set()  # parameters whose main_grad holds this step's gradient
        self.grad_kernel = kernel_runs_on(device)  # move gradients into main_grad with the Triton kernel
        self._in_flight: list[_Bucket] = []  # ZeRO-2/3: reductions launched, not yet added to grad_shard
        self._buckets_of_module: dict[int, list[_Bucket]] = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in ordered]

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return  # a weight gradient a zero-bubble B put off: the W brings it (parallel.weight_grad)
        bucket = self._bucket_of[param]  # type: ignore[index]
        if self.zero >= 2:
            if bucket.reduced_into is not None:  # last micro-batch's reduction still reads the buffer
                self._in_flight.remove(bucket)
                self._complete(bucket)
            if ensure_storage(bucket.buffer):
                bucket.buffer[bucket.numel :].zero_()  # the padding is reduced too; keep it finite
        written = param in self._written
        into_main_grad(param.main_grad, param.grad, add=written, kernel=self.grad_kernel)  # type: ignore[attr-defined]
        if not written:
            self._written.add(param)  # type: ignore[arg-type]
        param.grad = None  # free the compute-dtype gradient right away
        # ZeRO-2/3 reduce every micro-batch: the full gradient must not outlive its backward.
        if not self.sync_this_backward and self.zero < 2:
            return
        bucket.ready.add(param)  # type: ignore[arg-type]
        if len(bucket.ready) == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        bucket.ready.clear()
        if self.zero >= 2:
            self._launch_sharded(bucket)
            return
        if self.dp_size == 1:
            return
        # Sum of 1/d-scaled gradients = the mean (gloo has no AVG everywhere).
        bucket.buffer.div_(self.dp_size)
        if self.zero:
            lo, hi = bucket.shard
            with track.collective(self.dp_group, "reduce_scatter(grad bucket)"):
                bucket.handle = reduce_scatter_flat(
                    bucket.buffer[lo:hi], bucket.buffer, group=self.dp_group, async_op=True
                )
        else:
            with track.collective(self.dp_group, "all_reduce(grad bucket)"):
                bucket.handle = dist.all_reduce(bucket.buffer, group=self.dp_group, async_op=True)

    def _launch_sharded(self, bucket: _Bucket) -> None:
        """ZeRO-2/3: reduce-scatter this micro-batch's gradient of the bucket into (or onto) its shard."""
        assert bucket.grad_shard is not None
        for p in bucket.params:  # the next micro-batch starts the full buffer afresh
            self._written.discard(p)
        out = torch.empty_like(bucket.grad_shard) if bucket.shard_written else bucket.grad_shard
        bucket.reduced_into = out
        if self.dp_size == 1:
            out.copy_(bucket.buffer)
        else:
            bucket.buffer.div_(self.dp_size)
            with track.collective(self.dp_group, "reduce_scatter(grad bucket)"):
                bucket.handle = reduce_scatter_flat(out, bucket.buffer, group=self.dp_group, async_op=True)
        self._in_flight.append(bucket)
        # Keep one reduction in flight behind the backward; the older ones' full buffers can go.
        while len(self._in_flight) > 1:
            self._complete(self._in_flight.pop(0))

    def _complete(self, bucket: _Bucket) -> None:
        """ZeRO-2/3: wait for the bucket's reduction, add it to grad_shard and free the full gradient."""
        assert bucket.grad_shard is not None and bucket.reduced_into is not None
        if bucket.handle is not None:
            with track.waiting_for(self.dp_group, "reduce_scatter(grad bucket)"):
                bucket.handle.wait()
            bucket.handle = None
        if bucket.reduced_into is not bucket.grad_shard:
            bucket.grad_shard.add_(bucket.reduced_into)
        bucket.reduced_into = None
        bucket.shard_written = True
        free_storage(bucket.buffer)

    def finish(self) -> None:
        """Wait for every bucket's reduction (launching any whose hooks did not all fire)."""
        if self.zero >= 2:
            self._finish_sharded()
            return
        for bucket in self.buckets:
            if self.sync_this_backward and bucket.handle is None and len(bucket.ready) < len(bucket.params):
                for p in bucket.params:  # no gradient this step: reduce zeros, not last step's values
                    if p not in self._written:
                        p.main_grad.zero_()  # type: ignore[attr-defined]
                self._launch(bucket)
            if bucket.handle is not None:
                op = "reduce_scatter(grad bucket)" if self.zero else "all_reduce(grad bucket)"
                with track.waiting_for(self.dp_group, op):
                    bucket.handle.wait()
                bucket.handle = None
            bucket.ready.clear()

    def _finish_sharded(self) -> None:
        for bucket in self.buckets:
            if any(p in self._written for p in bucket.params):  # a partly complete bucket
                for p in bucket.params:
                    if p not in self._written:
                        p.main_grad.zero_()  # type: ignore[attr-defined]
                self._launch(bucket)
        while self._in_flight:
            self._complete(self._in_flight.pop(0))
        for bucket in self.buckets:
            assert bucket.grad_shard is not None
            if not bucket.shard_written:  # no gradient at all this step
                bucket.grad_shard.zero_()
                bucket.shard_written = True

    def reset(self) -> None:
        """Start a new step: the next backward overwrites the gradient buffers (direct: drops `.grad`)."""
        for p in self._direct:
            p.grad = None
        self._written.clear()
        for bucket in self.buckets:
            bucket.shard_written = False

    def owned_ranges(self) -> list[tuple[nn.Parameter, int, int]]:
        """(parameter, start, end): the flat ranges of each parameter this rank updates.

        The whole of every parameter without ZeRO; with ZeRO, the parts inside this rank's shards.
        """
        if self.direct:
            return [(p, 0, p.numel()) for p in self._direct]
        return [(p, a, b) for p, a, b, _ in self._owned()]

    def _owned(self) -> list[tuple[nn.Parameter, int, int, _Bucket]]:
        ranges = []
        for bucket in self.buckets:
            lo, hi = bucket.shard
            for p in bucket.params:
                start = bucket.offsets[p]
                a, b = max(start, lo), min(start + p.numel(), hi)
                if a < b:
                    ranges.append((p, a - start, b - start, bucket))
        return ranges

    def owned_grads(self) -> list[torch.Tensor]:
        """The reduced fp32 gradient of each owned range (owned_ranges' order), valid after `finish`.
        Direct: each parameter's `.grad` of this step (zeros where it has none), flat."""
        if self.direct:
            return [
                torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if p.grad is None else p.grad.view(-1)
                for p in self._direct
            ]
        grads = []
        for p, a, b, bucket in self._owned():
            at = bucket.offsets[p] + a
            if bucket.grad_shard is None:
                grads.append(bucket.buffer[at : at + b - a])
            else:
                lo = bucket.shard[0]
                grads.append(bucket.grad_shard[at - lo : at - lo + b - a])
        return grads

    def owned_weights(self) -> list[torch.Tensor]:
        """This rank's copy of each owned range (owned_ranges' order): what the optimizer updates."""
        if self.direct:
            return [p.data.view(-1) for p in self._direct]
        weights = []
        for p, a, b, bucket in self._owned():
            if bucket.param_shard is None:
                weights.append(p.data.view(-1)[a:b])
            else:
                at = bucket.offsets[p] + a - bucket.shard[0]
                weights.append(bucket.param_shard[at : at + b - a])
        return weights

    def gather_params(self) -> None:
        """ZeRO-1/2: start bringing every rank the parameters the others updated (one all-gather per
        bucket); ZeRO-3 gathers each unit when it is used instead, and frees here what the update made
        stale.

        The all-gathers run in the background, in forward order (the buckets holding the first layers
        first), so they overlap the next forward pass: `wait_for(module)` blocks only until the buckets
        holding that module's parameters have arrived, and `wait_params()` until all have.
        """
        if self.zero >= 3:
            # Whatever is still whole (the embedding after its backward, or everything after `quiesce`)
            # holds the old values: free it, the next use gathers the updated shards.
            for bucket in self.buckets:
                self._wait([bucket])
                assert bucket.param_buffer is not None
                free_storage(bucket.param_buffer)
            return
        if not self.zero or self.dp_size == 1:
            return
        for bucket in reversed(self.buckets):  # buckets are filled last layer first
            assert bucket.param_buffer is not None
            lo, hi = bucket.shard
            with track.collective(self.dp_group, "all_gather(parameters)"):
                bucket.gather = all_gather_flat(
                    bucket.param_buffer, bucket.param_buffer[lo:hi], group=self.dp_group, async_op=True
                )

    def _wait(self, buckets: list[_Bucket]) -> None:
        for bucket in buckets:
            if bucket.gather is not None:
                with track.waiting_for(self.dp_group, "all_gather(parameters)"):
                    bucket.gather.wait()
                bucket.gather = None

    def wait_params(self) -> None:
        """Block until every parameter all-gather started by `gather_params` has landed."""
        self._wait(self.buckets)

    def quiesce(self) -> None:
        """Return once no collective of this GradSync still writes into the parameters, and (ZeRO-3)
        every parameter is whole, for whatever reads or writes them outside a step (a checkpoint, a test).

        Call between steps; ZeRO-3 frees each unit again as the next forward leaves it.
        """
        assert all(b.handle is None for b in self.buckets), "a gradient reduction is in flight"
        self.wait_params()
        if self.zero >= 3:
            self.materialize()

    def materialize(self) -> None:
        """ZeRO-3: gather every bucket's parameters from the shards (synchronously)."""
        for bucket in self.buckets:
            self._wait([bucket])
            gather_bucket(bucket, self.dp_group, async_op=False)

    def wait_for(self, module: nn.Module) -> None:
        """Block until the parameters of `module` (and its children) are current."""
        self._wait(self.buckets_of(module))

    def buckets_of(self, module: nn.Module) -> list[_Bucket]:
        """The buckets holding any parameter of `module` (and its children)."""
        key = id(module)
        if key not in self._buckets_of_module:
            ids = {id(p) for p in module.parameters()}
            self._buckets_of_module[key] = [b for b in self.buckets if any(id(p) in ids for p in b.params)]
        return self._buckets_of_module[key]

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()


def _tensorwise(p: nn.Parameter) -> bool:
    """A float8 linear's weight under the tensorwise recipe (see threefold.parallel.fp8_gather)."""
    return getattr(p, "float8_recipe", None) == "tensorwise"


def gather_bucket(
    bucket: _Bucket, dp_group: ProcessGroup, *, async_op: bool, float8: bool = False
) -> dist.Work | Float8Gather | None:
    """ZeRO-3: refill the bucket's full parameter buffer from every rank's `param_shard` (a no-op when
    it is already whole); returns the all-gather's handle when `async_op`. `float8`: for the layers'
    forward and backward, a bucket of float8 linears' weights travels as float8 (parallel.fp8_gather)."""
    assert bucket.param_buffer is not None and bucket.param_shard is not None
    if bucket.fp8_values and not float8:
        free_storage(bucket.param_buffer)  # float8-rounded: gather the weights themselves
    if not ensure_storage(bucket.param_buffer):
        return None
    bucket.fp8_values = False
    if dist.get_world_size(dp_group) == 1:
        bucket.param_buffer.copy_(bucket.param_shard)
        return None
    if float8 and bucket.fp8_gather:
        bucket.fp8_values = True
        assert async_op, "the layers' gathers are asynchronous"
        return gather_float8(bucket, dp_group)
    with track.collective(dp_group, "all_gather(parameters)"):
        return all_gather_flat(bucket.param_buffer, bucket.param_shard, group=dp_group, async_op=async_op)


def all_reduce_tp_replicated_grads(
    grads: list[tuple[nn.Parameter, torch.Tensor]], tp_group: ProcessGroup
) -> None:
    """Sum over the TP group the gradients each TP rank holds only a part of, in one all-reduce:

    - replicated parameters that only saw a sequence chunk (norms, biases under sequence parallelism);
    - shards replicated over consecutive TP ranks (`tp_replicas` > 1: the key/value projections when
      tp_size exceeds num_kv_heads), each replica having seen only its own query heads.

    `grads` pairs each parameter with the part of its fp32 gradient this rank updates (all of it without
    ZeRO): the same range on every TP rank, as every TP rank's buckets hold the same shapes.

    A replicated shard travels in a buffer with one slot per distinct shard, zero but for this rank's,
    so the sum over the group leaves in each slot the sum over that shard's replicas. This needs no
    process group beyond the TP group, for num_shards times the shard's bytes: the k and v weights are a
    small part of a layer, and num_shards (= num_kv_heads) is 1 for multi-query attention.
    """
    tp_size = dist.get_world_size(tp_group)
    if tp_size == 1:
        return
    tp_rank = dist.get_rank(tp_group)
    summed: list[torch.Tensor] = []  # gradients to sum, each with the slot it occupies (None: all of it)
    slots: list[tuple[int, int] | None] = []
    for p, g in grads:
        if getattr(p, "sequence_parallel", False):
            summed.append(g)
            slots.append(None)
        elif tp_replicas(p) > 1:
            summed.append(g)
            slots.append((tp_shard_index(p, tp_rank), num_tp_shards(p, tp_size)))
    if not summed:
        return
    pieces = []
    for g, slot in zip(summed, slots, strict=True):
        if slot is None:
            pieces.append(g.reshape(-1))
        else:
            index, count = slot
            padded = g.new_zeros(count, g.numel())
            padded[index] = g.reshape(-1)
            pieces.append(padded.view(-1))
    flat = torch.cat(pieces)
    with track.collective(tp_group, "all_reduce(tp-partial grads)"):
        dist.all_reduce(flat, group=tp_group)
    sums = [
        t if slot is None else t.view(slot[1], -1)[slot[0]]
        for t, slot in zip(flat.split([p.numel() for p in pieces]), slots, strict=True)
    ]
    torch._foreach_copy_(summed, [t.view_as(g) for t, g in zip(sums, summed, strict=True)])
