"""ZeRO-3's parameter all-gather in float8, for the float8 linears' weights (parallel.zero_fp8_gather).

Each rank holds a flat range of a bucket, which may cut through tensors. The gather:
1. takes the amax of each weight's piece in this rank's shard and all-reduces the maximum over the
   data-parallel group: each weight's amax as a whole tensor;
2. casts each piece to e4m3 with that tensor's power-of-two scale (threefold.parallel.fp8's), one byte an
   element, and all-gathers the bytes;
3. on `wait`, writes the float8 values, times the inverse scale, into the bucket's bf16 parameter buffer.

Why the GEMMs see no difference: they cast a weight to float8 with a tensorwise power-of-two scale of its
own amax. A weight that already holds float8 values times a power of two casts back to exactly those
values, because its amax gives the same scale, or twice it when the amax rounded down to 224; doubling a
float8 value is exact, and the GEMM's inverse scale halves it back. So against a bf16 gather of the same
buckets only the bytes on the wire change (tests/test_fp8.py checks it to the bit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from threefold.parallel import fp8, track
from threefold.parallel.comm import all_gather_flat

if TYPE_CHECKING:
    from threefold.parallel.data_parallel import _Bucket


class Float8Gather:
    """A float8 all-gather in flight; `wait` lands it and fills the bucket's parameter buffer."""

    def __init__(
        self,
        work: dist.Work | None,
        wire: torch.Tensor,
        full: torch.Tensor,
        bucket: _Bucket,
        inverse: torch.Tensor,
    ) -> None:
        self.work, self.full, self.bucket, self.inverse = work, full, bucket, inverse
        self.wire = wire  # this rank's bytes, kept alive until the all-gather has read them

    def wait(self) -> bool:
        if self.work is not None:
            self.work.wait()
        buffer, values = self.bucket.param_buffer, self.full.view(fp8.E4M3)
        assert buffer is not None
        for i, p in enumerate(self.bucket.params):
            start = self.bucket.offsets[p]
            piece = values[start : start + p.numel()]
            buffer[start : start + p.numel()] = (piece.float() * self.inverse[i]).to(buffer.dtype)
        return True


def pieces(bucket: _Bucket) -> list[tuple[int, int, int]]:
    """(parameter index, start, end) of each parameter's part of this rank's shard, in shard coordinates."""
    lo, hi = bucket.shard
    out = []
    for i, p in enumerate(bucket.params):
        start, end = max(bucket.offsets[p], lo), min(bucket.offsets[p] + p.numel(), hi)
        if start < end:
            out.append((i, start - lo, end - lo))
    return out


def gather_float8(bucket: _Bucket, dp_group: ProcessGroup) -> Float8Gather:
    """Start the float8 all-gather of a ZeRO-3 bucket of float8 linears' weights (see the module)."""
    shard = bucket.param_shard
    assert shard is not None and bucket.param_buffer is not None
    amax = torch.zeros(len(bucket.params), dtype=torch.float32, device=shard.device)
    parts = pieces(bucket)
    for i, start, end in parts:
        amax[i] = fp8.amax(shard[start:end]).float()
    with track.collective(dp_group, "all_reduce(float8 amax)"):
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=dp_group)
    scale = fp8.scale_from_amax(amax, fp8.E4M3)
    wire = torch.zeros(shard.numel(), dtype=torch.uint8, device=shard.device)  # padding stays 0
    for i, start, end in parts:
        wire[start:end] = fp8.to_fp8(shard[start:end], scale[i], fp8.E4M3).view(torch.uint8)
    full = torch.empty(bucket.param_buffer.numel(), dtype=torch.uint8, device=shard.device)
    with track.collective(dp_group, "all_gather(float8 parameters)"):
        work = all_gather_flat(full, wire, group=dp_group, async_op=True)
    return Float8Gather(work, wire, full, bucket, scale.reciprocal())
