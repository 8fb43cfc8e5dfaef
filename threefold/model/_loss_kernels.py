"""The Triton kernels of threefold/model/loss.py (imported only where Triton runs)."""

import triton
import triton.language as tl


@triton.jit
def _row_stats(row_logits, num_valid, BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """The max of a row's first num_valid logits and the sum of their exp(logit - max), in fp32, in one
    read (the max found so far rescales the running sum). BLOCKS = cdiv(num_valid, BLOCK), a constant:
    Triton's interpreter cannot loop to a runtime bound."""
    offsets = tl.arange(0, BLOCK)
    running_max = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    running_sum = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    for block in range(0, BLOCKS):
        cols = block * BLOCK + offsets
        x = tl.load(row_logits + cols, mask=cols < num_valid, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))  # finite: the block has a valid entry
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    return running_max, running_sum


@triton.jit
def _grad_block(row_logits, row_out, cols, log_norm, hot, scale, num_valid, num_cols):
    """A row's columns `cols` of the gradient scale * (exp(logit - log_norm) - (col == hot)), 0 in the
    padding columns from num_valid up to num_cols; row_out may be row_logits (each entry is read first)."""
    x = tl.load(row_logits + cols, mask=cols < num_valid, other=float("-inf")).to(tl.float32)
    g = (tl.exp(x - log_norm) - tl.where(cols == hot, 1.0, 0.0)) * scale
    tl.store(row_out + cols, g.to(row_out.dtype.element_ty), mask=cols < num_cols)


@triton.jit
def row_stats_kernel(
    logits, row_stride, out_max, out_sum, num_valid, BLOCKS: tl.constexpr, BLOCK: tl.constexpr
):
    """Per row of (rows, >= num_valid) logits: its max and sum of exponentials (`_row_stats`)."""
    row = tl.program_id(0)
    row_max, row_sum = _row_stats(logits + row.to(tl.int64) * row_stride, num_valid, BLOCKS, BLOCK)
    tl.store(out_max + row, row_max)
    tl.store(out_sum + row, row_sum)


@triton.jit
def grad_kernel(logits, out, row_stride, log_norm, hot_col, scale, num_valid, num_cols, BLOCK: tl.constexpr):
    """out[r, c] = scale * (exp(logits[r, c] - log_norm[r]) - (c == hot_col[r])) for c < num_valid, and 0
    for the padding columns up to num_cols, one program per row and BLOCK columns; out may be logits."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    base = row.to(tl.int64) * row_stride
    norm, hot = tl.load(log_norm + row), tl.load(hot_col + row)
    _grad_block(logits + base, out + base, cols, norm, hot, scale, num_valid, num_cols)


@triton.jit
def scaled_sum_kernel(
    acc,
    first,
    first_scale,
    second,
    second_scale,
    factor,
    out,
    num_cols,
    numel,
    HAS_ACC: tl.constexpr,
    HAS_SECOND: tl.constexpr,
    HAS_FACTOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = ((acc +) first * first_scale (+ second * second_scale)) (* factor), element-wise over
    (rows, num_cols) contiguous tensors, the scales one per column, in fp32 and in that order, written in
    out's dtype. acc is fp32; factor is a one-element fp32 tensor."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    cols = offsets % num_cols
    total = tl.load(first + offsets, mask=mask).to(tl.float32) * tl.load(first_scale + cols, mask=mask).to(
        tl.float32
    )
    if HAS_ACC:
        total = tl.load(acc + offsets, mask=mask) + total
    if HAS_SECOND:
        term = tl.load(second + offsets, mask=mask).to(tl.float32)
        total = total + term * tl.load(second_scale + cols, mask=mask).to(tl.float32)
    if HAS_FACTOR:
        total = total * tl.load(factor)
    tl.store(out + offsets, total.to(out.dtype.element_ty), mask=mask)


@triton.jit
def one_rank_kernel(
    logits,
    out,
    row_stride,
    hot_col,
    row_loss,
    scale,
    rows,
    num_valid,
    num_cols,
    ROWS_PER_PROGRAM: tl.constexpr,
    VALID_BLOCKS: tl.constexpr,
    BLOCKS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Where one rank holds the whole vocabulary, both kernels above in one: for each of its rows (row
    program_id, then every num_programs-th), the max and sum of exponentials over the first num_valid
    logits, the row's loss log(sum) - (logits[hot] - max) (log(sum) where hot is -1), then the gradient
    written as grad_kernel writes it. The row's second read follows its first within one program, so with
    few programs in flight (one or two per SM) the logits are still in L2 and HBM sees them once."""
    offsets = tl.arange(0, BLOCK)
    for i in range(0, ROWS_PER_PROGRAM):
        row = tl.program_id(0) + i * tl.num_programs(0)
        if row < rows:
            base = row.to(tl.int64) * row_stride
            row_max, row_sum = _row_stats(logits + base, num_valid, VALID_BLOCKS, BLOCK)
            hot = tl.load(hot_col + row)
            target = tl.load(logits + base + tl.maximum(hot, 0)).to(tl.float32) - row_max
            target = tl.where(hot >= 0, target, 0.0)
            log_sum = tl.log(row_sum)
            tl.store(row_loss + row, log_sum - target)
            log_norm = row_max + log_sum
            for block in range(0, BLOCKS):
                cols = block * BLOCK + offsets
                _grad_block(logits + base, out + base, cols, log_norm, hot, scale, num_valid, num_cols)
