"""FP8 linear layers: the three GEMMs of y = x W^T in float8 with dynamic scaling, on torch._scaled_mm.

Shapes: M tokens (b*s), K input features, N output features (local to this TP rank where sharded).

Each GEMM's operands are cast to float8 just before it, with scales computed from the tensors
themselves (dynamic scaling: no amax history, no state, nothing in checkpoints):

    forward      y      = x  @ W^T     x, W  in e4m3 (3 mantissa bits, range 448)
    backward     grad_x = dy @ W       dy in the recipe's gradient format, W in e4m3
                 grad_W = dy^T @ x     dy likewise, x in e4m3

Accumulation is in fp32 inside the GEMM; outputs are in the input dtype (bf16). The gradient is always
the left operand, the side _scaled_mm's row-wise kernel accepts in either format.

Two recipes (`training.fp8`), as torchao defines them:
- 'tensorwise': one scale per operand, fp8_max / amax(|t|). Cheapest, and what cuBLAS's fp8 GEMM
  reads directly. Gradients in e5m2 (2 mantissa bits, range 57344): with one scale for the whole
  tensor, their spread (far wider than that of activations and weights) needs the range.
- 'rowwise': one scale per row of the left operand and per column of the right one, each taken over
  the contraction dimension (the layout _scaled_mm's row-wise kernel requires). One outlier token then
  costs precision only in its own row, and each row's scale covers its own range, so gradients keep
  e4m3's extra mantissa bit (half the rounding error of e5m2). The backward GEMMs contract over other
  dimensions than the forward, so each operand is scaled afresh along the dimension its GEMM sums over.

Scales are rounded down to a power of two: multiplying by one and by its inverse is exact, so the only
error is float8's own rounding (and the bound the tests check is the format's).

Why our own autograd Function rather than torchao's Float8Linear: threefold's tensor-parallel layers
are not nn.Linear, and the column-parallel projections run their GEMMs inside their own autograd
Function (to overlap the input gradient's all-reduce with the weight gradients), which a module swap
cannot reach. The GEMM helpers here serve both that Function and a plain linear. The float8 math is
four lines on top of torch._scaled_mm; the one kernel of our own, the transposed cast (eager code, and
rowwise under compile: KERNEL_UNDER_COMPILE), is Triton, which CUDA builds of torch bring, so the GPU
machine needs nothing beyond torch.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, NamedTuple

import torch

from threefold.config import Fp8Recipe

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}  # 448, 57344
GRAD_DTYPE = {"tensorwise": E5M2, "rowwise": E4M3}
"""The float8 format of the output gradient dy under each recipe."""
AMAX_FLOOR = 1e-12
"""An all-zero tensor (or row) would divide by zero; its scale is capped at fp8_max / AMAX_FLOOR."""


class Operand(NamedTuple):
    """One side of a float8 GEMM: `data * scale` approximates the high-precision tensor."""

    data: torch.Tensor
    """The float8 values, laid out as _scaled_mm wants this side (left: row-major, right: column-major)."""
    scale: torch.Tensor
    """fp32 dequantization scale: () tensorwise; (rows, 1) for a left, (1, columns) for a right operand."""


class GradOperands(NamedTuple):
    """dy cast for the backward's two GEMMs; None where that gradient is not needed."""

    for_input: Operand | None
    """dy (M, N), row-major: the left operand of dy W."""
    for_weight: Operand | None
    """dy^T (N, M), row-major: the left operand of dy^T x."""


def scale_for(t: torch.Tensor, dtype: torch.dtype, dim: int | None) -> torch.Tensor:
    """The power-of-two factor that brings amax(|t|) (over all of t, or over `dim`, kept) within dtype's
    range: 2^floor(log2(fp8_max / amax)), fp32."""
    return scale_from_amax(amax(t, dim), dtype)


def amax(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max |t| over all of t, or over `dim` (kept), in t's dtype. Eager code reads t once for its least
    and greatest values (max |t| is the larger of max t and -min t, exactly, NaN included): abs().amax()
    would first write |t| in full, a 262M-element copy for a 128k-vocabulary output weight. Compiled code
    keeps abs().amax(), which the compiler fuses into the one read itself."""
    if torch.compiler.is_compiling():
        return t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    low, high = torch.aminmax(t) if dim is None else torch.aminmax(t, dim=dim, keepdim=True)
    return torch.maximum(high, low.neg())


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^floor(log2(fp8_max / amax)) elementwise, fp32: the scale `scale_for` gives a tensor of that amax."""
    ratio = FP8_MAX[dtype] / amax.float().clamp(min=AMAX_FLOOR)
    return torch.exp2(torch.floor(torch.log2(ratio)))


def to_fp8(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t * scale in `dtype`, saturated at +-fp8_max: the float8 casts overflow to NaN or inf otherwise."""
    limit = FP8_MAX[dtype]
    return (t.float() * scale).clamp(-limit, limit).to(dtype)


def quantize(t: torch.Tensor, dtype: torch.dtype, dim: int | None) -> Operand:
    """t in float8 with one scale (dim None) or one per slice reduced over `dim`; layout of t kept."""
    scale = scale_for(t, dtype, dim)
    return Operand(to_fp8(t, scale, dtype), scale.reciprocal())


TILE = 64
"""Rows and columns of the tile one program of the transposed cast moves."""


_TRITON = importlib.util.find_spec("triton") is not None


@torch.library.triton_op("threefold::fp8_transposed_cast", mutates_args=())
def transposed_cast(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """to_fp8(t, scale, dtype).t().contiguous() for 2-D t (R, C) of any strides, `scale` broadcast to it:
    (C, R), row-major. On CUDA one Triton kernel does it in tiles (threefold/parallel/_fp8_kernel.py),
    reading and writing whole tiles where torch's copy writes float8 bytes a row apart. Eager code uses
    it; compiled code where KERNEL_UNDER_COMPILE says so for the recipe. A Triton operator, so that
    compiled code launches the kernel from its own generated code (no trip through the dispatcher and
    Triton's Python launcher) and does not fuse into it."""
    if not (t.is_cuda and _TRITON):
        return to_fp8(t, scale, dtype).t().contiguous()
    from threefold.parallel._fp8_kernel import transposed_cast_kernel  # imports triton

    rows, cols = t.shape
    out = torch.empty((cols, rows), dtype=dtype, device=t.device)
    # The scale's strides as broadcast to (rows, cols), 0 along its size-1 dimensions. Not an expanded
    # tensor: the compiler may write an expanded argument out in full (4 bytes an element of t).
    scale = scale.float().reshape(scale.shape if scale.dim() == 2 else (1, 1))
    s_row, s_col, along = scale_strides(scale)
    grid = ((rows + TILE - 1) // TILE, (cols + TILE - 1) // TILE)
    torch.library.wrap_triton(transposed_cast_kernel)[grid](
        t, out, scale, rows, cols, *t.stride(), s_row, s_col, FP8_MAX[dtype], along,
        BLOCK_ROWS=TILE, BLOCK_COLS=TILE, num_warps=4,
    )  # fmt: skip
    return out


def scale_strides(scale: torch.Tensor) -> tuple[int, int, int]:
    """A 2-D scale's strides as broadcast to its tensor (0 along its size-1 dimensions) and the kernel's
    SCALE_ALONG for them: 0 one value, 1 one per row, 2 one per column, 3 per element."""
    s_row = scale.stride(0) if scale.shape[0] > 1 else 0
    s_col = scale.stride(1) if scale.shape[1] > 1 else 0
    return s_row, s_col, (1 if s_row else 0) + (2 if s_col else 0)


KERNEL_UNDER_COMPILE: dict[Fp8Recipe, bool] = {"tensorwise": False, "rowwise": True}
"""Per recipe, whether code compiled by torch.compile casts transposed operands with `transposed_cast`'s
kernel too (eager code on CUDA always does). Where off, the compiler fuses each cast and transpose with
the work that produces its input, inside the whole compiled layer. Measured on one H200, llama-1b,
micro-batch 8 (2026-12-04, docs/benchmarks.md): tensorwise ran 2.1% faster with the compiler's casts, its
peak 4.0 GiB lower; rowwise ran 4.9% faster with the kernel (225.8 against 236.8 ms a step; peaks 48.9
and 44.9 GiB), because the compiler fused RMSNorm, x's per-column amax and its transposed cast into one
reduction taking 2 ms a layer. A module-level switch for A/B runs (bench/profile_step.py
--fp8-kernel=on|off sets both recipes); set it before the first compile."""


def _transposed(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, recipe: Fp8Recipe) -> torch.Tensor:
    """to_fp8(t, scale, dtype).t().contiguous(): the Triton operator, or torch's ops for the compiler to
    fuse (KERNEL_UNDER_COMPILE)."""
    if torch.compiler.is_compiling() and not KERNEL_UNDER_COMPILE[recipe]:
        return to_fp8(t, scale, dtype).t().contiguous()
    return transposed_cast(t, scale, dtype)


def cast_as(
    t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, side: str, recipe: Fp8Recipe
) -> torch.Tensor:
    """t * scale in float8, laid out as _scaled_mm wants the left ('a': row-major) or right ('b':
    column-major) operand. Where that layout is the transpose of t's (every right operand but a weight's
    transpose, and a left one taken from a transposed view such as dy^T), `_transposed` writes it."""
    if side == "b":  # column-major: t^T's rows, one after the other
        return _transposed(t, scale, dtype, recipe).t()
    if t.is_contiguous() and (not t.is_cuda or torch.compiler.is_compiling()):
        # Compiled code fuses to_fp8 with the work that produces t. Eager CUDA code takes the kernel below
        # even for a contiguous t: one pass, where to_fp8 runs four of torch's kernels through fp32 copies
        # (27 bytes moved an element, not 3).
        return to_fp8(t, scale, dtype)
    return _transposed(t.t(), scale.t() if scale.dim() == 2 else scale, dtype, recipe)  # row-major, from t^T


def operand(
    t: torch.Tensor, dtype: torch.dtype, recipe: Fp8Recipe, side: str, scale: torch.Tensor | None = None
) -> Operand:
    """2-D t as the left ('a', (M, K)) or right ('b', (K, N)) operand of a float8 GEMM, scaled per the
    recipe: rowwise scales each row of a / column of b over the contraction dimension K. A tensorwise
    `scale` (t's own, found earlier) saves reading t once more for its amax."""
    if scale is None:
        scale = scale_for(t, dtype, None if recipe == "tensorwise" else (1 if side == "a" else 0))
    return Operand(cast_as(t, scale, dtype, side, recipe), scale.reciprocal())


def grad_operands(
    grad: torch.Tensor, recipe: Fp8Recipe, *, for_input: bool, for_weight: bool
) -> GradOperands:
    """The output gradient dy (M, N) as the left operand of the input gradient (dy) and of the weight
    gradient (dy^T), each where asked. Tensorwise, both share one amax (the same value), so dy is read
    once for it, not twice. Rowwise scales differ: dy's per row, dy^T's per column of dy."""
    dtype = GRAD_DTYPE[recipe]
    scale = scale_for(grad, dtype, None) if recipe == "tensorwise" else None
    return GradOperands(
        operand(grad, dtype, recipe, "a", scale) if for_input else None,
        operand(grad.t(), dtype, recipe, "a", scale) if for_weight else None,
    )


@functools.cache
def cpu_has_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU _scaled_mm takes one scale per row and column (2.13's does; 2.11's
    refuses anything but one scale per operand)."""
    one = torch.ones(16, 16).to(E4M3)
    try:
        torch._scaled_mm(one, one.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def matmul(a: Operand, b: Operand, out_dtype: torch.dtype, *, fast_accum: bool) -> torch.Tensor:
    """(a.data * a.scale) @ (b.data * b.scale) in out_dtype, accumulated in fp32 by the GEMM."""
    scale_a, scale_b = a.scale, b.scale
    if not a.data.is_cuda and scale_a.numel() == scale_b.numel() == 1 and cpu_has_rowwise_scaled_mm():
        # torch's CPU kernel for one scale per operand can be 1000x slower than its row-scaled one (41 s
        # against 0.05 s for 256 x 64 x 50272, torch 2.13): the same scales, one per row and column.
        scale_a = scale_a.reshape(1, 1).expand(a.data.shape[0], 1).contiguous()
        scale_b = scale_b.reshape(1, 1).expand(1, b.data.shape[1]).contiguous()
    return torch._scaled_mm(a.data, b.data, scale_a, scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum)


# The three GEMMs of a linear layer. Only the forward uses fast accumulation (Hopper's fp8 tensor cores
# then skip periodic promotion to full fp32): gradients are summed over every token and keep it.


class WeightOperands(NamedTuple):
    """A weight W (N, K) cast for both GEMMs that read it, as `weight_operands` makes them."""

    forward: Operand
    """W^T (K, N), column-major, as the right operand of x W^T."""
    backward: Operand
    """W (N, K), column-major, as the right operand of dy W."""


def flatten_weight_operands(cast: WeightOperands | None) -> tuple[torch.Tensor, ...]:
    """`cast`'s four tensors (none for None), for an autograd Function's arguments."""
    return () if cast is None else (*cast.forward, *cast.backward)


def unflatten_weight_operands(tensors: tuple[torch.Tensor, ...]) -> WeightOperands | None:
    """The WeightOperands `flatten_weight_operands` gave `tensors` for (None for none)."""
    if not tensors:
        return None
    f_data, f_scale, b_data, b_scale = tensors
    return WeightOperands(Operand(f_data, f_scale), Operand(b_data, b_scale))


def saved_backward(cast: WeightOperands | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`cast`'s backward operand as two tensors for save_for_backward ((None, None) without `cast`)."""
    return (None, None) if cast is None else (cast.backward.data, cast.backward.scale)


def restored_backward(data: torch.Tensor | None, scale: torch.Tensor | None) -> Operand | None:
    """The backward operand `saved_backward` saved as `data` and `scale` (None where it saved none)."""
    if data is None:
        return None
    assert scale is not None, "a saved float8 operand has its scale"
    return Operand(data, scale)


def weight_operands(weight: torch.Tensor, recipe: Fp8Recipe) -> WeightOperands:
    """W (N, K) cast as `forward_gemm` and `grad_input_gemm` cast it when given no operands."""
    return WeightOperands(operand(weight.t(), E4M3, recipe, "b"), operand(weight, E4M3, recipe, "b"))


def forward_gemm(
    x: Operand, weight: torch.Tensor, recipe: Fp8Recipe, out_dtype: torch.dtype, cast: Operand | None = None
) -> torch.Tensor:
    """x W^T: x (M, K) already a left operand (shared by projections reading one input), W (N, K); `cast`,
    W's forward operand made earlier (`WeightOperands.forward`), else W is cast here."""
    w = operand(weight.t(), E4M3, recipe, "b") if cast is None else cast
    return matmul(x, w, out_dtype, fast_accum=True)  # (M, N)


def grad_input_gemm(
    grad: Operand,
    weight: torch.Tensor,
    recipe: Fp8Recipe,
    out_dtype: torch.dtype,
    cast: Operand | None = None,
) -> torch.Tensor:
    """dy W: dy (M, N) already a left operand (`grad_operands`), W (N, K) -> (M, K); `cast`, W's backward
    operand made earlier (`WeightOperands.backward`), else W is cast here."""
    w = operand(weight, E4M3, recipe, "b") if cast is None else cast
    return matmul(grad, w, out_dtype, fast_accum=False)


def grad_weight_gemm(grad_t: Operand, x: Operand, out_dtype: torch.dtype) -> torch.Tensor:
    """dy^T x: dy^T (N, M) already a left operand (`grad_operands`), x (M, K) a right one -> (N, K)."""
    return matmul(grad_t, x, out_dtype, fast_accum=False)


class _Fp8Linear(torch.autograd.Function):
    """x W^T for x (M, K), W (N, K), all three GEMMs in float8. It saves x itself and casts it for the
    weight gradient in the backward; saving the float8 copy made in the forward instead measured the
    same speed and peak memory (llama-1b, one H200, docs/benchmarks.md), and x is the simpler.
    Tensorwise, x's scale from the forward is kept too, so the backward does not read x again for its
    amax."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe, *cast: torch.Tensor
    ) -> torch.Tensor:
        """`cast`: the weight's float8 operands made earlier (`WeightOperands`, flattened into four tensor
        arguments: `flatten_weight_operands`), or nothing."""
        ctx.recipe, ctx.num_cast = recipe, len(cast)
        x_a = operand(x, E4M3, recipe, "a")
        # a tensorwise dequantization scale is a power of two, so its reciprocal is the exact cast scale
        x_scale = x_a.scale if recipe == "tensorwise" else None
        w_cast = unflatten_weight_operands(cast)
        ctx.save_for_backward(x, weight, x_scale, *saved_backward(w_cast))
        return forward_gemm(x_a, weight, recipe, x.dtype, w_cast.forward if w_cast is not None else None)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, weight, x_scale, w_data, w_scale = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_operands(grad, ctx.recipe, for_input=need_x, for_weight=need_w)
        grad_x = grad_weight = None
        if g.for_input is not None:
            w_cast = restored_backward(w_data, w_scale)
            grad_x = grad_input_gemm(g.for_input, weight, ctx.recipe, grad.dtype, w_cast)
        if g.for_weight is not None:
            cast = None if x_scale is None else x_scale.reciprocal()
            grad_weight = grad_weight_gemm(g.for_weight, operand(x, E4M3, ctx.recipe, "b", cast), grad.dtype)
        return grad_x, grad_weight, None, *([None] * ctx.num_cast)


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe, cast: WeightOperands | None = None
) -> torch.Tensor:
    """F.linear(x, weight) without bias, its GEMMs in float8: x (..., K), weight (N, K) -> (..., N). `cast`:
    the weight's float8 operands made earlier (threefold.parallel.fp8_cache), else it is cast here."""
    # 2-D inside the Function: an output that was a view of its result would refuse in-place ops after
    # (the tensor-parallel all-reduce).
    y = _Fp8Linear.apply(x.reshape(-1, x.shape[-1]), weight, recipe, *flatten_weight_operands(cast))
    return y.view(*x.shape[:-1], weight.shape[0])
