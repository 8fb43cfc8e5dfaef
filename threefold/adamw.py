"""AdamW's update of fp32 masters, with the copy into the bf16 weights in the same pass, on CUDA.

torch's fused AdamW updates the masters and moments in one multi-tensor kernel, and a second pass then
copies every master into its bf16 weight. Here one Triton kernel per parameter (threefold/_adamw_kernel.py)
reads the gradient, the master and both moments once and writes the master, the moments and the bf16
weight: 30 bytes per element instead of 28 + 6 in two kernels (docs/benchmarks.md has the measurement).
Elsewhere the optimizer keeps torch's AdamW: written with torch operations the same update ran 5-7 times
slower than torch's foreach AdamW on the CPU. The tests run the kernel on the CPU under Triton's
interpreter (TRITON_INTERPRET=1) against torch's AdamW.

The arithmetic is AdamW's as torch writes it (decoupled decay, bias corrections from the step count,
`eps` added after the square root), in fp32. Clipping divides each gradient by `scale` as it is read;
`skip` (a device bool) leaves everything, the step counts included, as it was, so the caller never reads a
value back to the host. The learning rate is a device tensor too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

BLOCK = 1024
"""Elements per Triton program: 8 per thread of NUM_WARPS warps, in 16-byte loads."""
NUM_WARPS = 4
"""Warps per program. 1024 / 4 measured 10.66 ms for a step over 1.5B parameters against 10.94 for 2048 / 8
(3.94 against 3.84 TB/s), the masters equal bit for bit; the fastest of seven shapes (one H200, torch 2.11,
2026-12-04, `python bench/adamw_blocks.py`: bench/results/issue18-2026-12-04-s9/call5-adamw_blocks.txt)."""


ONE_LAUNCH = False
"""Update every tensor of a call in one kernel launch (`adamw_tensors_kernel`, reading each tensor's
addresses from a table) instead of one launch per tensor: 147 launches a step for llama-1b, each some
microseconds of host time, which counts where the host, not the GPU, sets the pace (micro-batch 4 on one
H200 showed the GPU idle 4-6% of a step, 2026-12-04). Off: measured at llama-1b bf16 micro-batch 4 on an
H200 it saved nothing (65,333 against 65,684 tokens/s, 2026-12-05, bench/results/issue18-2026-12-05-s13/),
as the host is not the pace there. A module-level switch for A/B runs (bench/fp8.py --one-launch-adamw)."""


def adamw_update(
    masters: Sequence[torch.Tensor],
    avgs: Sequence[torch.Tensor],
    squares: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor | None],
    decays: Sequence[float],
    *,
    lr: torch.Tensor,
    scale: torch.Tensor,
    skip: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    cache: TableCache | None = None,
) -> None:
    """One AdamW step, in place, of each fp32 master with its first and second moments (`avgs`,
    `squares`), 0-dim fp32 step count and gradient; then the master into its weight (None: the master is
    the weight). `decays` are per tensor; `lr`, `scale` (the gradients are divided by it) and `skip` are
    0-dim device tensors. One Triton kernel launch per tensor (contiguous tensors), or with ONE_LAUNCH one
    for all, its tables kept in `cache` (the caller's, between steps); the kernel compiles once, in about a
    second, where torch.compile of a 1B model's list of updates took minutes."""
    from threefold._adamw_kernel import adamw_kernel  # imports triton: only where it runs

    beta1, beta2 = betas
    keep = skip.logical_not().float()
    constants = (lr, scale, keep, beta1, beta2, math.log2(beta1), math.log2(beta2), eps)
    rows = list(zip(masters, avgs, squares, steps, grads, weights, decays, strict=True))
    if ONE_LAUNCH:
        _update_in_one_launch(rows, constants, {} if cache is None else cache)
    else:
        for master, avg, square, step, grad, weight, decay in rows:
            n = master.numel()
            adamw_kernel[((n + BLOCK - 1) // BLOCK,)](
                master, avg, square, grad, _weight_or(master, weight), n, step, *constants[:3],
                decay, *constants[3:], HAS_WEIGHT=weight is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
            )  # fmt: skip
    # A list of tensors, not the 0-dim `keep` alone: that overload reads it as a host scalar (.item()),
    # which would make the host wait for the device every step.
    torch._foreach_add_(list(steps), [keep] * len(steps))


class _Tables:
    """One group's tensor tables on the device for `adamw_tensors_kernel`: which tensor each program
    updates, and each tensor's first program, addresses, size and decay. Built again whenever any
    address or decay differs from the ones it was built for (a state tensor replaced, e.g. by loading a
    checkpoint), so the kernel never writes through a stale address."""

    def __init__(self, key: tuple[float, ...], tensors: list[tuple[torch.Tensor, ...]], decays: list[float]):
        device = tensors[0][0].device
        blocks = [(t[0].numel() + BLOCK - 1) // BLOCK for t in tensors]
        starts = [0, *itertools.accumulate(blocks[:-1])]
        self.key = key
        self.num_blocks = sum(blocks)
        self.block_tensor = torch.repeat_interleave(
            torch.arange(len(blocks), dtype=torch.int32), torch.tensor(blocks)
        ).to(device)
        self.first_block = torch.tensor(starts, dtype=torch.int32, device=device)
        # master, avg, square, weight, step addresses: rows of one int64 table
        self.addresses = torch.tensor([[t[i].data_ptr() for t in tensors] for i in range(5)], device=device)
        self.sizes = torch.tensor([t[0].numel() for t in tensors], dtype=torch.int64, device=device)
        self.decays = torch.tensor(decays, dtype=torch.float32, device=device)


def _weight_or(master: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The tensor the update writes the weight into: the master itself where there is no other weight."""
    return master if weight is None else weight


TableCache = dict[tuple[torch.dtype, torch.dtype | None], _Tables]
"""The last tables built per (gradient dtype, weight dtype), kept by the caller between steps."""


def _update_in_one_launch(rows: list[tuple], constants: tuple, cache: TableCache) -> None:
    """`adamw_update`'s work in one launch per (gradient dtype, weight dtype) group of tensors, the
    tables from `cache` where still valid; the gradients' addresses (new tensors every step) go to the
    device each call."""
    import triton.language as tl

    from threefold._adamw_kernel import adamw_tensors_kernel

    element = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    groups: dict[tuple[torch.dtype, torch.dtype | None], list[tuple]] = {}
    for row in rows:  # (master, avg, square, step, grad, weight, decay)
        groups.setdefault((row[4].dtype, None if row[5] is None else row[5].dtype), []).append(row)
    for (grad_dtype, weight_dtype), members in groups.items():
        tensors: list[tuple[torch.Tensor, ...]] = [
            (master, avg, square, _weight_or(master, weight), step)
            for master, avg, square, step, _, weight, _ in members
        ]
        decays = [row[6] for row in members]
        key = (*(t.data_ptr() for row in tensors for t in row), *decays)
        tables = cache.get((grad_dtype, weight_dtype))
        if tables is None or tables.key != key:
            tables = cache[(grad_dtype, weight_dtype)] = _Tables(key, tensors, decays)
        if tables.num_blocks == 0:  # only empty tensors
            continue
        device = tensors[0][0].device
        grad_addresses = torch.tensor([row[4].data_ptr() for row in members]).to(device, non_blocking=True)
        master_at, avg_at, square_at, weight_at, step_at = tables.addresses
        adamw_tensors_kernel[(tables.num_blocks,)](
            tables.block_tensor, tables.first_block, master_at, avg_at, square_at, grad_addresses, weight_at,
            tables.sizes, step_at, tables.decays, *constants,
            GRAD=element[grad_dtype], WEIGHT=element[weight_dtype or torch.float32],
            HAS_WEIGHT=weight_dtype is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
