"""The output layer and the cross-entropy in one pass that never holds the full logits.

For a micro-batch of n tokens and a vocabulary shard of Vl = Vp/t columns, the plain path keeps the
(n, Vl) logits in bf16, an fp32 copy, and an fp32 softmax for backward: for llama-1b at b=4, s=2048
that is 6 GiB and a dozen passes over it. Here the tokens go through in chunks of at most
`CHUNK_ELEMENTS` logits; for each chunk the forward computes the logits, the loss, and right away the
gradient of the loss with respect to the logits, which it turns into the chunk's share of the input
gradient (g @ W) and of the weight gradient (g^T @ x). Backward only scales those by the incoming
gradient. Peak extra memory: one chunk of logits plus an fp32 weight-gradient accumulator.

Under tensor parallelism each rank holds Vl columns: the row max and the (target logit, sum of
exponentials) pair are all-reduced over the TP group, as in `layers.vocab_parallel_cross_entropy`.
With `compiled=True` (training.compile) where Triton runs, a chunk's element-wise work is two Triton
kernels (`_kernel_chunk`): one read of the bf16 logits gives each row's max and sum of exponentials
together, and one pass writes the gradient over the logits. torch.compile's kernels for the same math
took three passes, the max and the sum apart, and divided for the softmax: on one H200, a chunk of
llama-1b (8371 x 128256 bf16 logits) took 3.23 ms that way and 1.77 ms here (bench/step_kernels.py,
docs/benchmarks.md); the gradient taking the logits' memory also lowers the peak by one chunk of logits
(1.9 GiB at micro-batch 8). Each rank's sum is taken at its own max, then rescaled to the all-reduced
one. Where one rank holds the whole vocabulary there is nothing to all-reduce between the two passes, and
one kernel can make both (`one_rank_kernel`, behind ONE_RANK_KERNEL until measured): a few programs in
flight per SM, each taking its rows one by one, so that a row's second read comes from L2 rather than
HBM. Elsewhere the same math runs in place on one fp32 buffer (`_eager_chunk`).

With training.fp8_output_layer the chunk's three GEMMs run in float8 (threefold.parallel.fp8): x and the
weight in e4m3, scaled per row or column as the rowwise recipe scales the layers' operands whatever recipe the
layers use (the weight's column scales over all TP ranks' rows, so any tp rounds as one process does), and the
weight cast twice per call (once per GEMM that reads it), not per chunk. The logits' gradient g = (softmax -
one_hot) / n lies within [-1/n, 1/n] whatever the logits, so it needs no amax: it is written straight in e5m2
at one fixed power-of-two scale (`GRAD_CAST`), by the same kernel (or eager code) that computes it. e5m2's
range (2^-16 to 57344) keeps probabilities down to about 1e-9 of the row's largest entry, where e4m3's (2^-9
to 448) would flush the tail of a 128k vocabulary's softmax to zero. The weight gradient reads g transposed, a
byte-for-byte copy of the float8 values (`fp8.transposed_cast` at scale 1). Both gradient GEMMs apply their
column scales after cuBLAS's one-scale kernel rather than in its slower row-scaled one (`_Fp8Gemms`). The
chunks' weight-gradient products are held in the compute dtype with their column scales (HELD_PARTS at most,
then summed into fp32), and the backward sums them with the incoming gradient in one pass (`_scaled_sum`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from threefold.config.validate import FP8_MULTIPLE
from threefold.model import CHUNK_ELEMENTS  # a global of this module too: tests shrink it here
from threefold.parallel import fp8 as float8
from threefold.parallel import track
from threefold.parallel.main_grad import kernel_runs_on

Reduce = Callable[[torch.Tensor], None]
"""An all-reduce over the TP group, in place; None where one rank holds the whole vocabulary."""

BLOCK = 4096
"""Logits per Triton program (16 per thread of 8 warps)."""
ONE_RANK_KERNEL = False
"""Whether one rank (no TP all-reduces) runs its chunk through `one_rank_kernel` rather than the two kernels
TP ranks run. Off until measured on a GPU (written 2026-12-08 without one: by the bytes it saves one read
of the logits, 4.2 GB a step at llama-1b's micro-batch 8, if the second read hits L2;
bench/step_kernels.py times its settings, bench/results/issue18-2026-12-08-s40/callB.sh the step)."""
ONE_RANK_PROGRAMS_PER_SM = 1
"""One rank's fused kernel (`one_rank_kernel`): programs in flight per SM, each taking its rows one at a
time, so that a row read for its max and sum is still in L2 when it is read again for its gradient."""
ONE_RANK_WARPS = 32
"""Warps of each of those programs."""
ONE_RANK_BLOCK = 16384
"""Logits each of those programs reads at once: with one program per SM, 16 KB a program per pass of its
loop, four 16-byte loads a thread in flight, where the two kernels' many programs keep HBM busy by number."""

GRAD_FORMAT = float8.E5M2
"""The float8 format of the logits' gradient (float8 output layer)."""
GRAD_CAST = 2.0**15
"""softmax - one_hot (within [-1, 1]) times this is g in GRAD_FORMAT: the largest power of two that keeps
1 within e5m2's 57344, so no value saturates and the scale needs no amax."""


def _kernel_chunk(
    logits: torch.Tensor,
    local_targets: torch.Tensor,
    owned: torch.Tensor,
    num_valid: int,
    scale: float,
    grad_dtype: torch.dtype | None,
    reduce_max: Reduce | None,
    reduce_sums: Reduce | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same result through two Triton kernels (CUDA, or the CPU under Triton's interpreter): one read
    of the bf16 logits for each row's max and sum of exponentials together, one read and write for the
    gradient, written over the logits (the chunk's fresh GEMM output, needed no more) where it keeps
    their dtype, else into a new tensor of `grad_dtype`. With ONE_RANK_KERNEL, on one rank (no reductions)
    with a gradient to write, both in one kernel whose second read of a row finds it in L2."""
    from threefold.model._loss_kernels import grad_kernel, one_rank_kernel, row_stats_kernel  # triton

    logits = logits.contiguous()
    rows, cols = logits.shape
    hot = local_targets.masked_fill(~owned, -1)  # no column is -1: no one-hot on the other ranks' targets
    if ONE_RANK_KERNEL and reduce_max is None and reduce_sums is None and grad_dtype is not None and rows:
        out = logits if grad_dtype == logits.dtype else torch.empty_like(logits, dtype=grad_dtype)
        row_loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
        programs = min(rows, ONE_RANK_PROGRAMS_PER_SM * _multiprocessors(logits.device))
        one_rank_kernel[(programs,)](
            logits, out, logits.stride(0), hot, row_loss, scale, rows, num_valid, cols,
            ROWS_PER_PROGRAM=-(-rows // programs), VALID_BLOCKS=-(-num_valid // ONE_RANK_BLOCK),
            BLOCKS=-(-cols // ONE_RANK_BLOCK), BLOCK=ONE_RANK_BLOCK, num_warps=ONE_RANK_WARPS,
        )  # fmt: skip
        return row_loss.sum(), out
    local_max = torch.empty(rows, dtype=torch.float32, device=logits.device)
    local_sum = torch.empty_like(local_max)
    stats_args = (logits, logits.stride(0), local_max, local_sum, num_valid)
    row_stats_kernel[(rows,)](*stats_args, BLOCKS=-(-num_valid // BLOCK), BLOCK=BLOCK, num_warps=8)
    row_max = local_max.clone()
    if reduce_max is not None:
        reduce_max(row_max)
    # Each rank summed exp(logit - its own max): rescaled to the global max (a factor of 1 on one rank; 0
    # on a rank whose columns are all padding, whose max is -inf and sum 0).
    sum_exp = local_sum * torch.exp(local_max - row_max)
    rows_index = torch.arange(rows, device=logits.device)
    target = (logits[rows_index, local_targets].float() - row_max).masked_fill(~owned, 0.0)
    both = torch.stack([target, sum_exp])
    if reduce_sums is not None:
        reduce_sums(both)
    loss = (both[1].log() - both[0]).sum()
    if grad_dtype is None:
        return loss, None
    log_norm = row_max + both[1].log()
    grid = (rows, -(-cols // BLOCK))
    out = logits if grad_dtype == logits.dtype else torch.empty_like(logits, dtype=grad_dtype)
    grad_kernel[grid](
        logits, out, logits.stride(0), log_norm, hot, scale, num_valid, cols, BLOCK=BLOCK, num_warps=8
    )
    return loss, out


def _multiprocessors(device: torch.device) -> int:
    """The device's SM count; 2 on the CPU (Triton's interpreter), so that the tests' programs take
    several rows each."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _eager_chunk(
    logits: torch.Tensor,
    local_targets: torch.Tensor,
    owned: torch.Tensor,
    num_valid: int,
    scale: float,
    grad_dtype: torch.dtype | None,
    reduce_max: Reduce | None,
    reduce_sums: Reduce | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same result without a compiler: in place on one fp32 buffer, the fewest passes over it.

    `logits` is the chunk's fresh GEMM output, so in fp32 it is overwritten rather than copied.
    """
    work = logits.float()
    if num_valid < work.shape[-1]:
        work[:, num_valid:] = float("-inf")  # padding columns are never predicted
    row_max = work.amax(dim=-1)
    if reduce_max is not None:
        reduce_max(row_max)
    work.sub_(row_max.unsqueeze(-1))
    rows = torch.arange(work.shape[0], device=work.device)
    target = work[rows, local_targets].masked_fill(~owned, 0.0)
    work.exp_()
    both = torch.stack([target, work.sum(dim=-1)])
    if reduce_sums is not None:
        reduce_sums(both)
    loss = (both[1].log() - both[0]).sum()
    if grad_dtype is None:
        return loss, None
    work.div_(both[1].unsqueeze(-1))  # the softmax
    work[rows, local_targets] -= owned.to(work.dtype)
    return loss, work.mul_(scale).to(grad_dtype)


HELD_PARTS = 2
"""Chunks' float8 weight-gradient products (compute dtype) held before they are summed into fp32: llama-1b's
micro-batch 8 has two chunks, summed with the incoming gradient in one pass in the backward."""


def _scaled_sum(
    acc: torch.Tensor | None,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    factor: torch.Tensor | None,
    dtype: torch.dtype,
    kernels: bool,
) -> torch.Tensor:
    """((acc +) sum of part * its column scales) (* factor) in fp32, in that order, written in `dtype`: one
    Triton pass where kernels run (`scaled_sum_kernel`), else torch's ops (the same values)."""
    assert 1 <= len(parts) <= HELD_PARTS
    first, first_scale = parts[0]
    if kernels:
        from threefold.model._loss_kernels import scaled_sum_kernel  # imports triton

        second, second_scale = parts[1] if len(parts) == 2 else (first, first_scale)
        out = torch.empty(first.shape, dtype=dtype, device=first.device)
        numel, cols = first.numel(), first.shape[-1]
        scaled_sum_kernel[(-(-numel // BLOCK),)](
            acc if acc is not None else first, first.contiguous(), first_scale.contiguous(),
            second.contiguous(), second_scale.contiguous(), factor if factor is not None else first_scale,
            out, cols, numel, HAS_ACC=acc is not None, HAS_SECOND=len(parts) == 2,
            HAS_FACTOR=factor is not None, BLOCK=BLOCK, num_warps=8,
        )  # fmt: skip
        return out
    total = torch.mul(
        first, first_scale, out=torch.empty(first.shape, dtype=torch.float32, device=first.device)
    )
    if acc is not None:
        total.add_(acc)  # acc + the first term: the kernel's sum, in place
    for part, scale in parts[1:]:
        total.addcmul_(part, scale)
    if factor is not None:
        total.mul_(factor)
    return total.to(dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        group: ProcessGroup,
        vocab_size: int,
        compiled: bool,
        fp8: bool,
        weight_casts: OutputWeightCasts | None,
    ) -> torch.Tensor:
        # x: (n, h), identical on the TP ranks; weight: (Vl, h) local; targets: (n,) global ids.
        n, local_vocab = x.shape[0], weight.shape[0]
        world = dist.get_world_size(group)
        vocab_start = dist.get_rank(group) * local_vocab
        num_valid = min(max(vocab_size - vocab_start, 0), local_vocab)

        def all_reduce_max(t: torch.Tensor) -> None:
            with track.collective(group, "all_reduce(logit max)"):
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)

        def all_reduce_sums(t: torch.Tensor) -> None:
            with track.collective(group, "all_reduce(softmax sums)"):
                dist.all_reduce(t, group=group)

        reduce_max: Reduce | None = all_reduce_max if world > 1 else None
        reduce_sums: Reduce | None = all_reduce_sums if world > 1 else None

        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        kernels = compiled and kernel_runs_on(x.device)
        chunk = max(1, min(n, CHUNK_ELEMENTS // max(1, local_vocab)))
        gemms = None
        if fp8:
            casts = weight_casts
            if casts is None:  # none kept for the step: cast for this call
                casts = output_weight_casts(weight, group, want_x=want_x)
            gemms = _Fp8Gemms(casts, n, weight.dtype, weight.device, want_w=want_w, kernels=kernels)
        if gemms is not None and chunk < n:
            # whole multiples of 16 tokens: the weight gradient's float8 GEMM contracts over the chunk
            chunk = max(FP8_MULTIPLE, chunk - chunk % FP8_MULTIPLE)
        grad_x = torch.empty_like(x) if want_x else None
        # One chunk: the weight gradient is one GEMM, in the weight's dtype (fp32 accumulation inside the
        # GEMM). Several: an fp32 sum of the chunks' GEMMs.
        grad_w = None
        if want_w and chunk < n and gemms is None:
            # In the compute dtype, the first chunk's product is written into the fp32 sum, not added to
            # zeros: no zeroing pass (1 GB at llama's 128k vocabulary), and on CUDA no read of it.
            empty = torch.empty if weight.dtype != torch.float32 else torch.zeros
            grad_w = empty(weight.shape, dtype=torch.float32, device=weight.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        want_grad = want_x or want_w
        for start in range(0, n, chunk):
            xc = x[start : start + chunk]
            local_targets = targets[start : start + chunk] - vocab_start
            owned = (local_targets >= 0) & (local_targets < local_vocab)
            local_targets = local_targets.masked_fill(~owned, 0)
            if gemms is not None:
                logits, grad_scale, grad_dtype = gemms.logits(xc), GRAD_CAST, GRAD_FORMAT
            else:
                logits = _mm(xc, weight.t())  # (c, Vl), in the compute dtype
                grad_scale, grad_dtype = 1.0 / n, logits.dtype
            chunk_loss, g = (_kernel_chunk if kernels else _eager_chunk)(
                logits, local_targets, owned, num_valid, grad_scale, grad_dtype if want_grad else None,
                reduce_max, reduce_sums,
            )  # fmt: skip
            loss_sum += chunk_loss
            if g is None:
                continue
            del logits
            if gemms is not None:
                gemms.backward(g, grad_x, start)
                continue
            if grad_x is not None:
                _mm(g, weight, out=grad_x[start : start + chunk])
            if want_w and grad_w is None:
                grad_w = _mm(g.t(), xc)  # the only chunk
            elif grad_w is not None:
                first = start == 0
                if grad_w.dtype == g.dtype:
                    grad_w.addmm_(g.t(), xc)
                elif grad_w.is_cuda:  # a bf16 GEMM per chunk whose fp32 output is (then adds into) grad_w
                    if first:
                        torch.mm(g.t(), xc, out_dtype=torch.float32, out=grad_w)
                    else:
                        torch.addmm(grad_w, g.t(), xc, out_dtype=torch.float32, out=grad_w)
                elif first:
                    grad_w.copy_(_mm(g.t(), xc))  # a bf16 GEMM per chunk, summed over chunks in fp32
                else:
                    grad_w += _mm(g.t(), xc)
        parts: list[torch.Tensor] = []  # float8: the held products and their column scales, flattened
        if gemms is not None and want_w:
            grad_w, parts = gemms.grad_weight, [t for part in gemms.parts for t in part]
        ctx.save_for_backward(grad_x, grad_w, *parts)
        ctx.weight_dtype, ctx.kernels = weight.dtype, kernels
        return loss_sum / n

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, grad_w, *flat = ctx.saved_tensors
        if grad_x is not None:
            grad_x = grad_x * grad_loss.to(grad_x.dtype)
        if flat:  # float8: the held products, their column scales and the incoming gradient, in one pass
            parts = list(zip(flat[::2], flat[1::2], strict=True))
            factor = grad_loss.to(torch.float32).reshape(1)
            grad_w = _scaled_sum(grad_w, parts, factor, ctx.weight_dtype, ctx.kernels)
        elif grad_w is not None:  # one pass: the product in grad_w's dtype, written in the weight's
            scaled = torch.empty(grad_w.shape, dtype=ctx.weight_dtype, device=grad_w.device)
            grad_w = torch.mul(grad_w, grad_loss.to(grad_w.dtype), out=scaled)
        return grad_x, grad_w, None, None, None, None, None, None


class OutputWeightCasts(NamedTuple):
    """The output weight W (Vl, h) cast for the float8 output layer's two GEMMs that read it."""

    logits: float8.Operand
    """W^T (h, Vl), column-major, scaled per vocabulary row: the right operand of x W^T."""
    input: tuple[torch.Tensor, torch.Tensor] | None
    """W (Vl, h) in e4m3, column-major, scaled per hidden column over the whole vocabulary (every TP
    rank's rows), and the columns' inverse scales (`_column_scaled`): for g W; None where no input
    gradient is wanted."""


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b in a's dtype (into `out` if given). On the CPU a bf16 product is formed in fp32 and rounded once,
    as a GPU's bf16 GEMM accumulates: on a CPU without bf16 arithmetic (AVX2), torch's bf16 GEMM took
    2.6-37x as long as this on the loss's three products for 32 tokens of the tests' tiny model (hidden 64)
    over the GPT-2 vocabulary (2026-12-07)."""
    if a.device.type == "cpu" and a.dtype == torch.bfloat16:
        product = torch.mm(a.float(), b.float())
        return product.to(a.dtype) if out is None else out.copy_(product)
    return torch.mm(a, b, out=out)


def output_weight_casts(
    weight: torch.Tensor, group: ProcessGroup, *, want_x: bool = True
) -> OutputWeightCasts:
    """The float8 operands of the output weight (Vl, h), this rank's rows of the vocabulary; the input
    gradient's column scales are taken over the whole vocabulary (an all-reduce over the TP `group`)."""
    logits = float8.operand(weight.t(), float8.E4M3, "rowwise", "b")  # (h, Vl), per vocab row
    if not want_x:
        return OutputWeightCasts(logits, None)
    amax = float8.amax(weight, 0).float()
    if dist.get_world_size(group) > 1:
        with track.collective(group, "all_reduce(output weight amax)"):
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    scale = float8.scale_from_amax(amax, float8.E4M3)
    return OutputWeightCasts(logits, _column_scaled(weight, scale, weight.dtype))


class _Fp8Gemms:
    """The output layer's GEMMs in float8 for one call: the weight cast once for the logits and once for
    the input gradient, the chunks' products, and the weight gradient summed over the chunks.

    Every operand of x and the weight is scaled per row or column along the GEMM's contraction, as the
    rowwise recipe scales the layers' operands, and g has one fixed scale. The logits' GEMM takes its
    scales inside cuBLAS's row-scaled kernel. The two gradient GEMMs take the one-scale kernel (1.1-1.6x
    faster here: bench/fp8_gemm_formats.py) and apply the weight's or x's column scales to their output
    columns after it: a column scale of the right operand multiplies its output column, and a power of
    two changes no rounding, so the values are those the row-scaled kernel would give."""

    def __init__(
        self,
        weight: OutputWeightCasts,
        n: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        want_w: bool,
        kernels: bool,
    ) -> None:
        """`weight`: the output weight's operands (`output_weight_casts`; made for this call, or kept for
        the step by threefold.parallel.fp8_cache); `dtype`: the compute dtype."""
        self.dtype = dtype
        self.kernels = kernels
        self.want_w = want_w
        self.g_scale = torch.full((), 1.0 / (n * GRAD_CAST), dtype=torch.float32, device=device)
        """g's values times this are the gradient of the mean over n."""
        self.one = torch.ones((), dtype=torch.float32, device=device)  # a unit scale
        self.w_logits = weight.logits
        self.w_input = weight.input
        self.x_weight: tuple[torch.Tensor, torch.Tensor] | None = None  # the chunk's x for g^T x
        self.grad_weight: torch.Tensor | None = None
        """The fp32 sum of the weight-gradient products folded so far (with their column scales)."""
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        """The chunks' products not yet in `grad_weight`, with the column scales they still want: the
        loss's backward sums them with the incoming gradient in one pass (`_scaled_sum`)."""

    def logits(self, xc: torch.Tensor) -> torch.Tensor:
        """xc W^T (c, Vl) in the compute dtype, fast accumulation as in the layers' forward GEMMs. The
        chunk's x is cast for the weight gradient here too, per hidden column over the chunk's tokens."""
        if self.want_w:
            self.x_weight = _column_scaled(xc, float8.scale_for(xc, float8.E4M3, 0), self.dtype)
        x_a = float8.operand(xc, float8.E4M3, "rowwise", "a")
        return float8.matmul(x_a, self.w_logits, self.dtype, fast_accum=True)

    def _product(self, g: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """g (in GRAD_FORMAT at its fixed scale) @ right (float8, column-major), before column scales."""
        return float8.matmul(
            float8.Operand(g, self.g_scale), float8.Operand(right, self.one), self.dtype, fast_accum=False
        )

    def backward(self, g: torch.Tensor, grad_x: torch.Tensor | None, start: int) -> None:
        """The chunk's share of the input gradient (written into grad_x at `start`) and of the weight
        gradient, from g (c, Vl) in GRAD_FORMAT, and the chunk's x as `logits` cast it."""
        if grad_x is not None:
            assert self.w_input is not None
            data, columns = self.w_input
            torch.mul(self._product(g, data), columns, out=grad_x[start : start + g.shape[0]])
        if not self.want_w:
            return
        assert self.x_weight is not None, "logits() casts the chunk's x before its backward"
        (data, columns), self.x_weight = self.x_weight, None
        part = self._product(float8.transposed_cast(g, self.one, GRAD_FORMAT), data)  # (Vl, h); exact g^T
        if len(self.parts) == HELD_PARTS:  # more chunks than are held: the held ones into the fp32 sum
            self.grad_weight = _scaled_sum(self.grad_weight, self.parts, None, torch.float32, self.kernels)
            self.parts = []
        self.parts.append((part, columns))


def _column_scaled(
    t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """t (R, C) times `scale` (1, C) in e4m3, laid out as a right operand (column-major), and the columns'
    inverse scales in `dtype` (powers of two, exact in it) to multiply the GEMM's output columns by."""
    return float8.cast_as(t, scale, float8.E4M3, "b", "rowwise"), scale.reciprocal().to(dtype)


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: ProcessGroup,
    vocab_size: int,
    compiled: bool = False,
    fp8: bool = False,
    weight_casts: OutputWeightCasts | None = None,
) -> torch.Tensor:
    """Mean cross-entropy (fp32 scalar) of logits x @ weight^T over the tokens of x.

    x: (..., h), the same on every TP rank; weight: (Vp/t, h), this rank's vocabulary rows; targets: (...)
    global token ids. Padding rows of the vocabulary (ids >= vocab_size) are never predicted. With `fp8`
    the GEMMs run in float8 (module docstring), reading `weight_casts` (the weight's float8 operands kept
    for the step, `output_weight_casts`) where given.
    """
    h = x.shape[-1]
    return _LinearCrossEntropy.apply(
        x.reshape(-1, h), weight, targets.reshape(-1), tp_group, vocab_size, compiled, fp8, weight_casts
    )
