"""The Triton kernel of threefold/parallel/main_grad.py (imported only where Triton runs)."""

import triton
import triton.language as tl


@triton.jit
def into_main_grad_kernel(main, grad, n, ADD: tl.constexpr, BLOCK: tl.constexpr):
    """main[i] = grad[i] (or main[i] + grad[i] with ADD) in fp32, for the elements of program `pid`."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    value = tl.load(grad + offsets, mask=inside, other=0.0).to(tl.float32)
    if ADD:
        value += tl.load(main + offsets, mask=inside, other=0.0)
    tl.store(main + offsets, value, mask=inside)
