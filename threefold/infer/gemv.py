"""A matrix-vector product for batch-1 decoding: one Triton kernel that streams the weight once.

A decode step of one token reads every weight once and does two FLOPs per weight element, so its speed is
the memory's. cuBLAS's kernels for a single row read a bf16 weight at about half of it on an H200, and the
compiler's product-and-sum reductions (`threefold.infer.step`'s "sum" form) vary with the shape. This
kernel gives each program a band of `BLOCK_N` weight rows, walks along the input features `BLOCK_K` at a
time with fp32 accumulation, and reduces once at the end; the band and chunk sizes are tuned per shape on
first use (`triton.autotune`, run outside any CUDA-graph capture by the decode step's warm-up calls).

`gemv` is a PyTorch custom operator, so a compiled step calls it as one opaque kernel and a CUDA graph
captures it. It needs Triton and a CUDA tensor; with `TRITON_INTERPRET=1` Triton runs it on CPU tensors,
which is how the tests check it against a float64 product.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the "sum" form is used instead (see `usable`)
    triton = None


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` can compute x @ weight^T here: Triton present, one row of x, a row-major weight, and
    a CUDA device (or Triton's interpreter, on CPU tensors)."""
    if triton is None or x.numel() != x.shape[-1] or weight.dim() != 2 or weight.stride(1) != 1:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    _CONFIGS = [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
        for n, k, w in [(1, 1024, 4), (2, 512, 4), (2, 1024, 4), (4, 256, 4), (4, 512, 4), (4, 1024, 8),
                        (8, 256, 4), (8, 512, 8), (16, 128, 4), (16, 256, 8), (32, 128, 8)]
    ]  # fmt: skip
    if os.environ.get("TRITON_INTERPRET") == "1":
        _CONFIGS = _CONFIGS[4:5]  # the interpreter runs a config in seconds: one that exercises the masks

    @triton.autotune(configs=_CONFIGS, key=["n", "K"])
    @triton.jit
    def _gemv_kernel(
        w_ptr, x_ptr, b_ptr, y_ptr, n, stride_w,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):  # K a constant: one compiled kernel per input width
            cols = start + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@torch.library.custom_op("threefold::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) with one row in all @ weight (out, in)^T [+ bias], accumulated in fp32; x's dtype."""
    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    grid: Any = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_kernel[grid](weight, x, bias if bias is not None else y, y, n, weight.stride(0),
                       K=k, HAS_BIAS=bias is not None)  # fmt: skip
    return y.view(*x.shape[:-1], n)


@gemv.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
