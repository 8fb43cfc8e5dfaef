"""training.mlp_backend = "quack" on the CPU: where the model routes its MLP to QuACK, and the checks.

QuACK's GEMMs run only on NVIDIA GPUs (tests/test_gpu.py compares them with the default MLP there). Here a
stand-in module with `quack.mlp.mlp_func`'s calling convention (the gate and up weights stacked as rows
[gate; up], "concat" layout) computes the MLP in plain torch, so that what threefold adds is checked
against the default path: the stacking of the two weights, the input made whole before it and the partial
sums reduced after it under tensor and sequence parallelism, and the gradients reaching the three
parameters.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from distributed import run_ranks

import threefold.model.quack_mlp as quack_mlp
from threefold.config import ModelConfig, build_config

CALLS: list[tuple[int, ...]] = []
"""The shapes of x each stand-in call saw (in the rank that made them)."""


def _mlp_func(x, stacked, down, *, activation, tuned, concat_layout):
    assert activation == "swiglu" and concat_layout and not tuned
    CALLS.append(tuple(x.shape))
    gate, up = F.linear(x, stacked).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


STAND_IN = types.SimpleNamespace(mlp_func=_mlp_func)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(quack_mlp, "kernels", lambda: STAND_IN)  # forked ranks inherit it


def _loss_and_grads(rank: int, world: int, backend: str, sequence_parallel: bool) -> tuple:
    from threefold.model.transformer import build_model
    from threefold.parallel.layers import TPContext

    CALLS.clear()
    cfg = ModelConfig(
        arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
        vocab_size=97, max_seq_len=32,
    )  # fmt: skip
    tokens = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(0))
    tp = TPContext(torch.distributed.group.WORLD, sequence_parallel, mlp_backend=backend)
    model = build_model(cfg, tp, seed=3)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, list(CALLS)


@pytest.mark.parametrize(
    "world,sequence_parallel", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2-sp"]
)
def test_a_llama_trains_through_the_quack_mlp_as_through_the_default(stand_in, world, sequence_parallel):
    """The tiny llama's loss and every gradient on every TP rank, the MLP through mlp_func against the
    default MLP, in float32 (the one GEMM of the stacked weights against two rounds differently only in
    the last bits); the whole sequence reaches mlp_func under sequence parallelism too."""
    runs = {b: run_ranks(world, _loss_and_grads, b, sequence_parallel) for b in ("auto", "quack")}
    for rank in range(world):
        loss, grads, calls = runs["auto"][rank]
        quack_loss, quack_grads, quack_calls = runs["quack"][rank]
        assert calls == [] and quack_calls == [(2, 32, 64)] * 2, quack_calls
        torch.testing.assert_close(quack_loss, loss, rtol=1e-6, atol=0)
        assert grads.keys() == quack_grads.keys()
        for name, grad in grads.items():
            assert grad is not None and grad.abs().max() > 0, name
            torch.testing.assert_close(
                quack_grads[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
            )


LLAMA = ["--model.preset=tiny", "--training.dtype=bfloat16", "--training.device=cuda"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--training.dtype=float32"], r"needs training.dtype = 'bfloat16' \(got 'float32'\)"),
        (["--training.device=cpu"], r"a CUDA GPU \(training.device = 'cpu'\)"),
        (["--training.fp8=rowwise"], r"training.fp8 = false \(got 'rowwise'\)"),
        (["--model.arch=gpt2"], r"model.arch = 'gpt2' has a GeLU MLP"),
        (["--model.ffn_hidden_size=100"], r"ffn_hidden_size / parallel.tp_size \(100 / 1 = 100\) to be"),
        (
            ["--parallel.pp_size=2", "--parallel.pipeline_schedule=zb-h1"],
            r"cannot defer the MLP's weight gradients as parallel.pipeline_schedule = 'zb-h1'",
        ),
    ],
    ids=["dtype", "cpu", "fp8", "gpt2", "width", "zero-bubble"],
)
def test_configs_the_quack_mlp_cannot_run_are_refused_naming_the_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config({}, [*LLAMA, "--training.mlp_backend=quack", *overrides], check_paths=False)


def test_the_quack_mlp_config_is_accepted():
    config = build_config({}, [*LLAMA, "--training.mlp_backend=quack"], check_paths=False)
    assert config.training.mlp_backend == "quack"
