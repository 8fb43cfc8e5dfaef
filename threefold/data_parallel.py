"""Data-parallel gradient averaging in buckets, overlapped with the backward pass.

Every parameter gets a `main_grad`: an fp32 view into a flat bucket buffer. A post-accumulate hook
moves each fresh `.grad` into `main_grad` (so bf16 training accumulates micro-batches in fp32) and,
on the last micro-batch of a step, launches the bucket's all-reduce as soon as all its parameters are
done; the remaining backward computation overlaps with that communication. Earlier micro-batches
only accumulate: gradients are synchronized once per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from threefold import watchdog


class _Bucket:
    def __init__(self, params: list[nn.Parameter], device: torch.device) -> None:
        self.params = params
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=device)
        offset = 0
        for p in params:
            p.main_grad = self.buffer[offset : offset + p.numel()].view_as(p)  # type: ignore[attr-defined]
            offset += p.numel()
        self.num_ready = 0
        self.handle: dist.Work | None = None


class GradSync:
    """Owns the fp32 gradient buffers of `params` and averages them over `dp_group`."""

    def __init__(self, params: list[nn.Parameter], *, dp_group: ProcessGroup, bucket_mb: float) -> None:
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group)
        self.sync_this_backward = True
        # Backward visits layers last-to-first, so fill buckets in reverse registration order.
        ordered = [p for p in reversed(params) if p.requires_grad]
        bucket_numel = max(1, int(bucket_mb * 2**20 / 4))
        groups: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in ordered:
            if groups[-1] and size + p.numel() > bucket_numel:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.numel()
        device = ordered[0].device if ordered else torch.device("cpu")
        self.buckets = [_Bucket(g, device) for g in groups if g]
        self._bucket_of: dict[nn.Parameter, _Bucket] = {p: b for b in self.buckets for p in b.params}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in ordered]

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        param.main_grad.add_(param.grad)  # type: ignore[attr-defined]
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
        bucket.buffer.div_(
            self.dp_size
        )  # sum of 1/d-scaled gradients = the mean (gloo has no AVG everywhere)
        with watchdog.collective(self.dp_group, "all_reduce(grad bucket)"):
            bucket.handle = dist.all_reduce(bucket.buffer, group=self.dp_group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket's all-reduce (launching any whose hooks did not all fire)."""
        for bucket in self.buckets:
            if self.sync_this_backward and bucket.handle is None and bucket.num_ready < len(bucket.params):
                self._launch(bucket)  # a parameter got no gradient this step: still sync its zeros
            if bucket.handle is not None:
                with watchdog.waiting_for(self.dp_group, "all_reduce(grad bucket)"):
                    bucket.handle.wait()
                bucket.handle = None
            bucket.num_ready = 0

    def zero(self) -> None:
        for bucket in self.buckets:
            bucket.buffer.zero_()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()


def all_reduce_sequence_parallel_grads(params: list[nn.Parameter], tp_group: ProcessGroup) -> None:
    """Sum the main_grads of replicated parameters that only saw a sequence chunk (norms, biases)."""
    grads = [p.main_grad for p in params if getattr(p, "sequence_parallel", False)]  # type: ignore[attr-defined]
    if not grads or dist.get_world_size(tp_group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    with watchdog.collective(tp_group, "all_reduce(sequence-parallel grads)"):
        dist.all_reduce(flat, group=tp_group)
    torch._foreach_copy_(
        grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]
    )
