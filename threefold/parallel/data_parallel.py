"""Data-parallel gradient reduction in buckets, overlapped with the backward pass, optionally ZeRO-1.

Every parameter gets a `main_grad`: an fp32 view into a flat bucket buffer. A post-accumulate hook
moves each fresh `.grad` into `main_grad` (so bf16 training accumulates micro-batches in fp32): the
first micro-batch of a step copies, later ones add, so the buffers never need zeroing. On the last
micro-batch of a step, a bucket's reduction starts as soon as all its parameters are done, and the rest
of the backward pass overlaps with it. Gradients are synchronized once per step.

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
from threefold.parallel.layers import num_tp_shards, pad_to_multiple, tp_replicas, tp_shard_index


class _Bucket:
    def __init__(
        self, params: list[nn.Parameter], device: torch.device, dp_rank: int, dp_size: int, zero: bool
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
        shard = padded // dp_size
        self.shard = (dp_rank * shard, (dp_rank + 1) * shard) if zero else (0, padded)
        """The flat range of the buffer this rank reduces and updates (all of it without ZeRO)."""
        self.num_ready = 0
        self.handle: dist.Work | None = None
        self.gather: dist.Work | None = None
        """The parameter all-gather in flight (ZeRO), waited for before the parameters are used."""


class GradSync:
    """Owns the fp32 gradient buffers of `params` and reduces them over `dp_group`.

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
        zero: bool = False,
        solo: list[nn.Parameter] | None = None,
    ) -> None:
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group)
        self.dp_rank = dist.get_rank(dp_group)
        self.zero = zero
        self.sync_this_backward = True
        solo_ids = {id(p) for p in solo or []}
        # Backward visits layers last-to-first, so fill buckets in reverse registration order.
        ordered = [p for p in reversed(params) if p.requires_grad]
        bucket_numel = max(1, int(bucket_mb * 2**20 / 4))
        groups: list[list[nn.Parameter]] = [[p] for p in ordered if id(p) in solo_ids]
        groups.append([])
        size = 0
        for p in ordered:
            if id(p) in solo_ids:
                continue
            if groups[-1] and size + p.numel() > bucket_numel:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.numel()
        device = ordered[0].device if ordered else torch.device("cpu")
        self.buckets = [_Bucket(g, device, self.dp_rank, self.dp_size, zero) for g in groups if g]
        self._bucket_of: dict[nn.Parameter, _Bucket] = {p: b for b in self.buckets for p in b.params}
        self._written: set[nn.Parameter] = set()  # parameters whose main_grad holds this step's gradient
        self._buckets_of_module: dict[int, list[_Bucket]] = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in ordered]

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return  # a weight gradient a zero-bubble B put off: the W brings it (parallel.weight_grad)
        if param in self._written:
            param.main_grad.add_(param.grad)  # type: ignore[attr-defined]
        else:
            param.main_grad.copy_(param.grad)  # type: ignore[attr-defined]
            self._written.add(param)  # type: ignore[arg-type]
        param.grad = None  # free the compute-dtype gradient right away
        if not self.sync_this_backward:
            return
        bucket = self._bucket_of[param]  # type: ignore[index]
        bucket.num_ready += 1
        if bucket.num_ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
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

    def finish(self) -> None:
        """Wait for every bucket's reduction (launching any whose hooks did not all fire)."""
        for bucket in self.buckets:
            if self.sync_this_backward and bucket.handle is None and bucket.num_ready < len(bucket.params):
                for p in bucket.params:  # no gradient this step: reduce zeros, not last step's values
                    if p not in self._written:
                        p.main_grad.zero_()  # type: ignore[attr-defined]
                self._launch(bucket)
            if bucket.handle is not None:
                op = "reduce_scatter(grad bucket)" if self.zero else "all_reduce(grad bucket)"
                with track.waiting_for(self.dp_group, op):
                    bucket.handle.wait()
                bucket.handle = None
            bucket.num_ready = 0

    def reset(self) -> None:
        """Start a new step: the next backward overwrites the gradient buffers."""
        self._written.clear()

    def owned_ranges(self) -> list[tuple[nn.Parameter, int, int]]:
        """(parameter, start, end): the flat ranges of each parameter this rank updates.

        The whole of every parameter without ZeRO; with ZeRO, the parts inside this rank's shards.
        """
        ranges = []
        for bucket in self.buckets:
            lo, hi = bucket.shard
            for p in bucket.params:
                start = bucket.offsets[p]
                a, b = max(start, lo), min(start + p.numel(), hi)
                if a < b:
                    ranges.append((p, a - start, b - start))
        return ranges

    def gather_params(self) -> None:
        """ZeRO: start bringing every rank the parameters the others updated (one all-gather per bucket).

        The all-gathers run in the background, in forward order (the buckets holding the first layers
        first), so they overlap the next forward pass: `wait_for(module)` blocks only until the buckets
        holding that module's parameters have arrived, and `wait_params()` until all have.
        """
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
        """Return once no collective of this GradSync still writes into the parameters.

        Call between steps, before anything outside the step reads or overwrites the parameters (a
        checkpoint save or load): every ZeRO parameter all-gather has then landed.
        """
        assert all(b.handle is None for b in self.buckets), "a gradient reduction is in flight"
        self.wait_params()

    def wait_for(self, module: nn.Module) -> None:
        """Block until the parameters of `module` (and its children) are current."""
        key = id(module)
        if key not in self._buckets_of_module:
            ids = {id(p) for p in module.parameters()}
            self._buckets_of_module[key] = [b for b in self.buckets if any(id(p) in ids for p in b.params)]
        self._wait(self._buckets_of_module[key])

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()


def all_reduce_tp_replicated_grads(params: list[nn.Parameter], tp_group: ProcessGroup) -> None:
    """Sum over the TP group the main_grads each TP rank holds only a part of, in one all-reduce:

    - replicated parameters that only saw a sequence chunk (norms, biases under sequence parallelism);
    - shards replicated over consecutive TP ranks (`tp_replicas` > 1: the key/value projections when
      tp_size exceeds num_kv_heads), each replica having seen only its own query heads.

    A replicated shard travels in a buffer with one slot per distinct shard, zero but for this rank's,
    so the sum over the group leaves in each slot the sum over that shard's replicas. This needs no
    process group beyond the TP group, for num_shards times the shard's bytes: the k and v weights are a
    small part of a layer, and num_shards (= num_kv_heads) is 1 for multi-query attention.
    """
    tp_size = dist.get_world_size(tp_group)
    if tp_size == 1:
        return
    tp_rank = dist.get_rank(tp_group)
    grads: list[torch.Tensor] = []  # main_grads to sum, each with the slot it occupies (None: all of it)
    slots: list[tuple[int, int] | None] = []
    for p in params:
        if getattr(p, "sequence_parallel", False):
            grads.append(p.main_grad)  # type: ignore[attr-defined]
            slots.append(None)
        elif tp_replicas(p) > 1:
            grads.append(p.main_grad)  # type: ignore[attr-defined]
            slots.append((tp_shard_index(p, tp_rank), num_tp_shards(p, tp_size)))
    if not grads:
        return
    pieces = []
    for g, slot in zip(grads, slots, strict=True):
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
    torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(sums, grads, strict=True)])
