"""The llama MLP through QuACK's GEMMs with SwiGLU in their epilogues: `training.mlp_backend = "quack"`.

Shape legend: n tokens on this rank (b * s), h hidden, f MLP width on this rank (ffn / tp_size).

The default MLP runs three cuBLAS GEMMs a pass and leaves SwiGLU to the compiled layer's element-wise
kernels: the gate and up outputs are written, read back for silu(gate) * up, and in the backward the
down projection's input gradient is written and read back beside them for the gate and up gradients.
QuACK (the `quack-kernels` package, which FlashAttention-4 depends on) has a GEMM that writes silu(gate)
* up from its accumulators as it writes gate and up, and one that turns the down projection's input
gradient into the gate and up gradients before it leaves the chip: two passes over (n, 2f) bf16 tensors
fewer in each direction, with the same GEMM work. The gate and up weights stay two parameters (checkpoint
names, Hugging Face import and export, TP sharding); each pass stacks them into one (2f, h) operand, a
copy of 2fh bf16 values.

Tensor parallelism wraps it as it wraps the default MLP: the input made whole on every rank first
(`TPContext.enter`), the down projection's partial sums reduced after (`RowParallelLinear.reduce`). The
numerics differ from the default path's in the last bits: SwiGLU is taken from the GEMM's fp32 accumulators
instead of from gate and up rounded to bf16.

The package is imported only when the backend is chosen; on a machine without it the choice fails with
what to install.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from types import ModuleType

import torch

from threefold.model.cute_packages import check_hopper_or_blackwell, import_kernels

KERNELS_MODULE = "quack.mlp"
"""Where QuACK's fused MLP lives (`quack-kernels` on PyPI)."""

EPILOGUE_MODULE = "quack.epilogue.library"
"""QuACK's library of GEMM epilogues (SwiGLU's among them), built when it is first imported."""

PIN = "quack-kernels==0.6.5"
"""The release this module was written and measured against (the one flash-attn-4==4.0.0b40 brings)."""


OPTION = "training.mlp_backend = 'quack'"


@functools.cache
def kernels() -> ModuleType:
    """QuACK's MLP module; a clear error when the package is missing or has changed, or when its epilogues
    cannot be built where the packages lie. The epilogue library is imported here, when the model is built,
    rather than by the first step."""
    module = import_kernels(KERNELS_MODULE, ("mlp_func",), OPTION, f"QuACK: pip install {PIN}", PIN)
    try:
        importlib.import_module(EPILOGUE_MODULE)
    except TypeError as e:
        if "fail-closed semantic key" not in str(e):
            raise
        # QuACK keys its compile cache on the code an epilogue calls, and leaves out code it counts as
        # installed: files under a site-packages or dist-packages folder. Anywhere else it walks into the
        # CuTe DSL's own functions and stops at a value it cannot key (seen with the packages unpacked onto
        # PYTHONPATH from another folder).
        spec = importlib.util.find_spec("cutlass")
        where = spec.origin if spec is not None else "not found"
        raise RuntimeError(
            f"{OPTION}: QuACK could not build its epilogues ({EPILOGUE_MODULE}: {e}). QuACK treats code "
            "outside a site-packages or dist-packages folder as the user's own and fingerprints it; the CuTe "
            f"DSL (cutlass: {where}) must be installed by pip, or lie in a folder named site-packages"
        ) from e
    return module


def check_quack_device(device: torch.device) -> None:
    """QuACK's epilogue GEMMs were written for Hopper and Blackwell; say so before a step fails elsewhere."""
    check_hopper_or_blackwell(device, OPTION)


def fused_mlp() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The MLP through QuACK, as a function of (x, gate, up, down): down(silu(x gate^T) * (x up^T)) for x
    (..., h) whole on this rank, gate and up (f, h), down (h', f), giving (..., h'), this rank's partial sum
    under tensor parallelism. QuACK's module is looked up here, when the model is built, so that compiled
    code calls the function alone."""
    mlp_func = kernels().mlp_func

    def swiglu_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        stacked = torch.cat([gate, up])  # (2f, h): rows [gate; up], QuACK's "concat" layout
        return mlp_func(x, stacked, down, activation="swiglu", tuned=False, concat_layout=True)

    return swiglu_mlp
