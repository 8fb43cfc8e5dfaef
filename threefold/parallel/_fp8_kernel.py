"""The Triton kernel of threefold/parallel/fp8.py's `transposed_cast` (imported only where Triton runs)."""

import triton
import triton.language as tl


@triton.jit
def transposed_cast_kernel(
    t, out, scale, rows, cols, t_row, t_col, s_row, s_col, LIMIT: tl.constexpr, SCALE_ALONG: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """out[c, r] = clamp(t[r, c] * scale[r, c], -LIMIT, LIMIT) in out's dtype, for one tile of t (any
    strides; the scale broadcast through its strides); out is (cols, rows), row-major. Triton stages the
    tile through shared memory, so the reads and the writes are both coalesced. SCALE_ALONG says how the
    scale varies (fp8.scale_strides gives it): 0 one value, 1 one per row, 2 one per column, 3 per element;
    along one axis it is read as one vector a tile and broadcast, not element by element.
    LIMIT (the format's largest value) is a compile-time constant, so the clamp stays in fp32: a float
    argument passed by torch.compile's launcher is fp64, and the GPU back end has no fp64 to float8
    conversion."""
    r = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    c = (tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)).to(tl.int64)
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    value = tl.load(t + r[:, None] * t_row + c[None, :] * t_col, mask=inside, other=0.0).to(tl.float32)
    if SCALE_ALONG == 0:
        value = value * tl.load(scale)
    elif SCALE_ALONG == 1:
        value = value * tl.load(scale + r * s_row, mask=r < rows, other=1.0)[:, None]
    elif SCALE_ALONG == 2:
        value = value * tl.load(scale + c * s_col, mask=c < cols, other=1.0)[None, :]
    else:
        value = value * tl.load(scale + r[:, None] * s_row + c[None, :] * s_col, mask=inside, other=1.0)
    value = tl.clamp(value, -LIMIT, LIMIT)
    tl.store(out + c[None, :] * rows + r[:, None], value.to(out.dtype.element_ty), mask=inside)
