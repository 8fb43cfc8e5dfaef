"""What the float8 tests compare threefold.parallel.fp8 with, written without its helpers: each format's
values found by search, tensors rounded through float8 with power-of-two scales, the relative error of a
result, and a training rank with the float8 device rule lifted so that float8 runs on the CPU.
tests/test_fp8.py, tests/test_fp8_output_layer.py and tests/test_gpu_fp8.py share them."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
from distributed import train_and_gather


def positive_values(dtype: torch.dtype) -> torch.Tensor:
    """The non-negative finite values of a float8 format in order of their bit patterns 0, 1, 2, ...,
    which is their numeric order: index i holds the value of code i."""
    values = torch.arange(128, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    return values[values.isfinite()]


def nearest(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each element of t rounded to the nearest value of the float8 format by search (no cast), ties to
    the even code as IEEE rounding does."""
    grid = positive_values(dtype).to(t.dtype)
    magnitude = t.abs().contiguous()
    index = torch.searchsorted(grid, magnitude).clamp(1, len(grid) - 1)
    below, above = grid[index - 1], grid[index]
    down, up = magnitude - below, above - magnitude
    take_below = (down < up) | ((down == up) & ((index - 1) % 2 == 0))
    return torch.where(take_below, below, above) * t.sign()


def emulated(t: torch.Tensor, dtype: torch.dtype, dim: int | None) -> torch.Tensor:
    """t rounded through float8 with a power-of-two scale per tensor (`dim` None) or per slice over `dim`:
    the reference a float8 GEMM's operands must match."""
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scale = 2.0 ** torch.floor(torch.log2(torch.finfo(dtype).max / amax))
    return nearest(t * scale, dtype) / scale


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64, on the CPU, whatever the tensors' device and dtype."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).norm() / want.norm()).item()


def train_fp8_on_cpu(rank: int, world_size: int, config: Any) -> dict:
    """`train_and_gather` with the float8 device rule lifted (float8 runs on the CPU here), recording its
    calls ("checked") and the float8 notice's lines in what the rank prints ("notices")."""
    import threefold.train as train_module

    checked = []
    train_module.check_fp8_device = lambda device, recipe: checked.append((device.type, recipe))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train_and_gather(rank, world_size, config)
    notices = [line for line in printed.getvalue().splitlines() if "training.compile = false" in line]
    return result | {"checked": checked, "notices": notices}
