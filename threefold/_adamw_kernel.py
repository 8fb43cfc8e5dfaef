"""The Triton kernel of threefold/adamw.py's `adamw_update` (imported only where Triton runs)."""

import triton
import triton.language as tl


@triton.jit
def adamw_kernel(
    master, avg, square, grad, weight, n, step, lr, scale, keep,
    decay, beta1, beta2, log2_beta1, log2_beta2, eps,
    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One AdamW step of elements [pid * BLOCK, (pid + 1) * BLOCK) of one tensor; nothing is stored when
    `keep` (a 0-dim fp32 device flag) is 0. `step` is the count before this step."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
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
