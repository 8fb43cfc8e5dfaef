"""A fresh gradient into its parameter's fp32 `main_grad`: the copy (or, for later micro-batches, the add)
that the data-parallel hook makes for every parameter in every backward.

torch's `copy_` and `add_` from bf16 into fp32 take an unvectorized casting path: on one H200 the 1.5B
gradients of llama-1b moved at about 1.7 TB/s, 5.1 ms a micro-batch (bench/profile_step.py,
docs/benchmarks.md). On CUDA, with Triton, one Triton kernel per parameter reads and writes in wide loads
instead. Elsewhere (the CPU, strided views, the same dtype on both sides) torch's operations stay. The tests
run the kernel on the CPU under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util
import os

import torch

BLOCK = 4096
"""Elements per Triton program: 16 per thread of 8 warps."""


def kernel_runs_on(device: torch.device) -> bool:
    """Whether threefold's Triton kernels may run on `device` (`into_main_grad`'s here, the loss's in
    threefold.model.loss): Triton is installed, and the device is CUDA (or the CPU under Triton's
    interpreter)."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return importlib.util.find_spec("triton") is not None and (device.type == "cuda" or interpreting)


def into_main_grad(main_grad: torch.Tensor, grad: torch.Tensor, add: bool, kernel: bool) -> None:
    """main_grad <- grad (or main_grad + grad with `add`), in fp32. With `kernel` (`kernel_runs_on` the
    device), through the Triton kernel when both are contiguous and of different dtypes; else, and for a
    same-dtype copy, which is already vectorized, through torch."""
    if not (kernel and grad.dtype != main_grad.dtype and main_grad.is_contiguous() and grad.is_contiguous()):
        if add:
            main_grad.add_(grad)
        else:
            main_grad.copy_(grad)
        return
    from threefold.parallel._main_grad_kernel import into_main_grad_kernel  # imports triton

    n = main_grad.numel()
    into_main_grad_kernel[((n + BLOCK - 1) // BLOCK,)](main_grad, grad, n, ADD=add, BLOCK=BLOCK, num_warps=8)
