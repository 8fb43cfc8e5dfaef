"""The Triton kernels of threefold/model/loss.py (imported only where Triton runs)."""

import triton
import triton.language as tl


@triton.jit
def row_stats_kernel(
    logits, row_stride, out_max, out_sum, num_valid, BLOCKS: tl.constexpr, BLOCK: tl.constexpr
):
    """Per row of (rows, >= num_valid) logits: the max of its first num_valid entries and the sum of
    their exp(logit - max), in fp32, in one read (the max found so far rescales the running sum).
    BLOCKS = cdiv(num_valid, BLOCK), a constant: Triton's interpreter cannot loop to a runtime bound."""
    row = tl.program_id(0)
    base = logits + row.to(tl.int64) * row_stride
    offsets = tl.arange(0, BLOCK)
    running_max = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    running_sum = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    for block in range(0, BLOCKS):
        cols = block * BLOCK + offsets
        x = tl.load(base + cols, mask=cols < num_valid, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))  # finite: the block has a valid entry
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    tl.store(out_max + row, running_max)
    tl.store(out_sum + row, running_sum)


@triton.jit
def grad_kernel(logits, out, row_stride, log_norm, hot_col, scale, num_valid, num_cols, BLOCK: tl.constexpr):
    """out[r, c] = scale * (exp(logits[r, c] - log_norm[r]) - (c == hot_col[r])) for c < num_valid, and 0
    for the padding columns up to num_cols; out may be logits itself (each entry is read, then written)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    base = row.to(tl.int64) * row_stride
    x = tl.load(logits + base + cols, mask=cols < num_valid, other=float("-inf")).to(tl.float32)
    norm = tl.load(log_norm + row)
    hot = tl.load(hot_col + row)
    g = (tl.exp(x - norm) - tl.where(cols == hot, 1.0, 0.0)) * scale
    tl.store(out + base + cols, g.to(out.dtype.element_ty), mask=cols < num_cols)


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
            running_max = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
            running_sum = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
            for block in range(0, VALID_BLOCKS):
                cols = block * BLOCK + offsets
                x = tl.load(logits + base + cols, mask=cols < num_valid, other=float("-inf")).to(tl.float32)
                new_max = tl.maximum(running_max, tl.max(x, axis=0))
                rescaled = running_sum * tl.exp(running_max - new_max)
                running_sum = rescaled + tl.sum(tl.exp(x - new_max), axis=0)
                running_max = new_max
            hot = tl.load(hot_col + row)
            target = tl.load(logits + base + tl.maximum(hot, 0)).to(tl.float32) - running_max
            target = tl.where(hot >= 0, target, 0.0)
            log_sum = tl.log(running_sum)
            tl.store(row_loss + row, log_sum - target)
            log_norm = running_max + log_sum
            for block in range(0, BLOCKS):
                cols = block * BLOCK + offsets
                x = tl.load(logits + base + cols, mask=cols < num_valid, other=float("-inf")).to(tl.float32)
                g = (tl.exp(x - log_norm) - tl.where(cols == hot, 1.0, 0.0)) * scale
                tl.store(out + base + cols, g.to(out.dtype.element_ty), mask=cols < num_cols)
