"""The Triton kernels of threefold/adamw.py's `adamw_update` (imported only where Triton runs)."""

import triton
import triton.language as tl


@triton.jit
def _update(
    master, avg, square, grad, weight, n, step, decay, block, lr, scale, keep,
    beta1, beta2, log2_beta1, log2_beta2, eps, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One AdamW step of elements [block * BLOCK, (block + 1) * BLOCK) of one tensor of `n`; nothing is
    stored when `keep` (a 0-dim fp32 device flag) is 0. `step` points at the count before this step."""
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    store = offsets < tl.where(tl.load(keep) != 0.0, n, 0)  # nothing when the step is skipped
    count = tl.load(step) + 1.0
    rate = tl.load(lr)
    g = tl.load(grad + offsets, mask=inside, other=0.0).to(tl.float32) / tl.load(scale)
    m = tl.load(avg + offsets, mask=inside, other=0.0)
    v = tl.load(square + offsets, mask=inside, other=0.0)
    p = tl.load(master + offsets, mask=inside, other=0.0)
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp for a weight below one half
    v = v * beta2 + (1.0 - beta2) * g * g
    step_size = rate / (1.0 - tl.exp2(count * log2_beta1))
    root_correction = tl.sqrt(1.0 - tl.exp2(count * log2_beta2))
    p = p * (1.0 - rate * decay) - step_size * m / (tl.sqrt(v) / root_correction + eps)
    tl.store(avg + offsets, m, mask=store)
    tl.store(square + offsets, v, mask=store)
    tl.store(master + offsets, p, mask=store)
    if HAS_WEIGHT:
        tl.store(weight + offsets, p.to(weight.dtype.element_ty), mask=store)


@triton.jit
def adamw_kernel(
    master, avg, square, grad, weight, n, step, lr, scale, keep,
    decay, beta1, beta2, log2_beta1, log2_beta2, eps,
    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One tensor, one program per BLOCK elements."""
    _update(
        master, avg, square, grad, weight, n, step, decay, tl.program_id(0), lr, scale, keep,
        beta1, beta2, log2_beta1, log2_beta2, eps, HAS_WEIGHT, BLOCK,
    )  # fmt: skip


@triton.jit
def adamw_tensors_kernel(
    block_tensor, first_block, masters, avgs, squares, grads, weights, sizes, steps, decays,
    lr, scale, keep, beta1, beta2, log2_beta1, log2_beta2, eps,
    GRAD: tl.constexpr, WEIGHT: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Every tensor of a list in one launch: program p updates block p - first_block[t] of tensor
    t = block_tensor[p], whose addresses (int64) and size come from the tables; GRAD and WEIGHT are the
    element types of the gradients and the weights (fp32 for masters and moments)."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    block = pid - tl.load(first_block + t)
    f32 = tl.pointer_type(tl.float32)
    master = tl.load(masters + t).to(f32)
    weight = tl.load(weights + t).to(tl.pointer_type(WEIGHT))
    _update(
        master, tl.load(avgs + t).to(f32), tl.load(squares + t).to(f32),
        tl.load(grads + t).to(tl.pointer_type(GRAD)), weight, tl.load(sizes + t), tl.load(steps + t).to(f32),
        tl.load(decays + t), block, lr, scale, keep, beta1, beta2, log2_beta1, log2_beta2, eps,
        HAS_WEIGHT, BLOCK,
    )  # fmt: skip
