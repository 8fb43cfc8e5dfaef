"""What threefold's two optional packages of CuTe-DSL kernels share: FlashAttention-4 (threefold.model.fa4)
and QuACK (threefold.model.quack_mlp) are imported only when their option is chosen, with what to install
when they are missing, and run on Hopper and Blackwell GPUs."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def import_kernels(
    module_name: str, names: tuple[str, ...], option: str, install: str, pin: str
) -> ModuleType:
    """Import `module_name` for `option` (e.g. "training.mlp_backend = 'quack'"); a RuntimeError saying
    what to install (`install`) when it is missing, and naming the release to pin (`pin`, "package==version")
    when it lacks one of `names`."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RuntimeError(f"{option} needs {install} (importing {module_name} failed: {e})") from e
    package = pin.split("==")[0]
    for name in names:
        if not hasattr(module, name):
            raise RuntimeError(
                f"{module_name} has no {name}: this {package} release is not one threefold knows; pin {pin}"
            )
    return module


def check_hopper_or_blackwell(device: torch.device, option: str) -> None:
    """The kernels run on compute capability 9.x (Hopper) and 10.x (Blackwell); say so before a step fails."""
    if device.type != "cuda":
        raise ValueError(f"{option} runs on CUDA GPUs, not on {device.type!r}")
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        raise ValueError(
            f"{option} needs a Hopper or Blackwell GPU (compute capability 9.x or 10.x); "
            f"{torch.cuda.get_device_name(device)} is {major}.{minor}: choose 'auto'"
        )
