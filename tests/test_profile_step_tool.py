"""bench/profile_step.py's launch summary (which operators launched the memsets; the host's waits), on
events shaped as torch's profiler gives them."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SPEC = importlib.util.spec_from_file_location(
    "profile_step", Path(__file__).parents[1] / "bench/profile_step.py"
)
assert SPEC is not None and SPEC.loader is not None
profile_step = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(profile_step)

CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA


def _event(name, start, end, *, device=CPU, kernels=(), parent=None, stack=()):
    return SimpleNamespace(
        name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end),
        kernels=[SimpleNamespace(name=k) for k in kernels], cpu_parent=parent, stack=list(stack),
    )  # fmt: skip


def test_launch_summary_counts_memsets_by_source_and_the_host_waits():
    step = _event("ProfilerStep", 0, 1000)
    zero = _event(
        "aten::zero_", 10, 20, kernels=["Memset (Device)", "Memset (Device)"], parent=step,
        stack=["torch/nn/x.py(1): f", "threefold/optim.py(12): step", "threefold/train.py(3): g"],
    )  # fmt: skip
    attention = _event("aten::_cudnn_attention_backward", 30, 40, kernels=["Memset (Device)", "sm90_bprop"])
    events = [
        step, zero, attention,
        _event("cudaLaunchKernel", 41, 45),  # a launch that did not wait
        _event("cuLaunchKernel", 50, 50 + 400),  # one that waited for the queue: 400 us
        _event("cudaDeviceSynchronize", 500, 500 + 600),  # the device
        _event("Memset (Device)", 60, 70, device=CUDA),  # a device event: neither a source nor a wait
        _event("aten::mm", 100, 900),  # a long operator is not a CUDA call
    ]  # fmt: skip
    waited_ms, calls, sources = profile_step.launch_summary(events, steps=2)
    assert waited_ms == pytest.approx((400 + 600) / 1e3 / 2) and calls == 1.0
    assert sources == {
        ("aten::zero_", "ProfilerStep", "threefold/optim.py(12): step"): 1.0,
        ("aten::_cudnn_attention_backward", "", ""): 0.5,
    }
