"""Gradients into the fp32 main_grad buffers (threefold/parallel/main_grad.py): the Triton kernel, run by
Triton's interpreter on the CPU, against torch's copy_ and add_, alone and inside the data-parallel hook."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from threefold.parallel.main_grad import into_main_grad, kernel_runs_on

INTERPRETED = """
import os
import torch
import torch.distributed as dist
from torch import nn
from threefold.parallel.main_grad import into_main_grad, kernel_runs_on
from threefold.parallel.data_parallel import GradSync
from threefold.parallel.mesh import build_mesh

assert kernel_runs_on(torch.device("cpu"))
torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float16):
    for n in (1, 4095, 4096, 4097, 9000):  # one element, block edges, several blocks
        first, second = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
        mine, theirs = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
        into_main_grad(mine, first, add=False, kernel=True)
        theirs.copy_(first)
        assert torch.equal(mine, theirs), (dtype, n, "copy")
        into_main_grad(mine, second, add=True, kernel=True)
        theirs.add_(second)
        assert torch.equal(mine, theirs), (dtype, n, "add")

# Inside the hook: two micro-batches of a bf16 model, the kernel against torch's copy_ and add_.
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
mesh = build_mesh(1, 1, 1)
results = []
torch.manual_seed(1)
model = nn.Sequential(nn.Linear(8, 300), nn.Tanh(), nn.Linear(300, 4)).to(torch.bfloat16)
expected = [torch.zeros(p.shape) for p in model.parameters()]
for micro in range(2):  # each micro-batch's bf16 gradient, summed in fp32
    torch.manual_seed(10 + micro)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    expected = [e + g.float() for e, g in zip(expected, grads)]
for kernel in (True, False):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 300), nn.Tanh(), nn.Linear(300, 4)).to(torch.bfloat16)
    sync = GradSync(list(model.parameters()), dp_group=mesh.dp_group, bucket_mb=1.0, zero=0)
    assert sync.grad_kernel
    sync.grad_kernel = kernel
    for micro in range(2):
        torch.manual_seed(10 + micro)
        x = torch.randn(5, 8, dtype=torch.bfloat16)
        sync.sync_this_backward = micro == 1  # the first adds nothing to the buckets' reductions
        model(x).square().sum().backward()
    sync.finish()
    results.append([p.main_grad.clone() for p in model.parameters()])
for a, b, e in zip(*results, expected):
    assert a.abs().sum() > 0 and torch.equal(a, b) and torch.equal(a, e)
dist.destroy_process_group()
print("same")
"""


def test_the_kernel_matches_torch_under_the_interpreter():
    """Copy and add, bf16 and fp16, at and around the block edges; then two micro-batches through the
    data-parallel hook, the kernel against torch's copy_ and add_: identical, bit for bit."""
    pytest.importorskip("triton")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PORT": str(port)}
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-3000:]


def test_without_the_kernel_torch_moves_the_gradient():
    """On the CPU (no interpreter) the kernel is not chosen; strided or same-dtype inputs go through
    torch even when it is."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not kernel_runs_on(torch.device("cpu"))
    grad = torch.randn(6, 4).to(torch.bfloat16)
    main = torch.zeros(4, 6)
    into_main_grad(main, grad.t(), add=False, kernel=True)  # strided: torch's copy_
    assert torch.equal(main, grad.t().float())
    into_main_grad(main, grad.t(), add=True, kernel=False)
    assert torch.equal(main, 2 * grad.t().float())
    same = torch.randn(4, 6)
    into_main_grad(main, same, add=False, kernel=True)  # fp32 into fp32: torch's copy_
    assert torch.equal(main, same)
