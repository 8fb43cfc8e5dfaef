"""Checkpoints written by older code still load, and today's code writes the same format-2 checkpoints.

tests/assets/ckpt_v2_* were saved by commit ace3ee7 (tests/assets/make_v2_checkpoints.py) under tp=2 and
under dp=2 with ZeRO; expected.safetensors holds what that code loaded from them into one process and the
result of one more step. Today's loader must give the same tensors, bit for bit, under any layout, and
today's writer, given the same training, the same manifest entries and tensors.

What training computed is compared to a float32 rounding tolerance, not bit for bit: the CPU's matrix
kernels sum in an order of their own per processor (an AVX-512 Xeon of 2026-12-05 differs from the
machine that made the assets in the last bits, up to 0.7% in Adam moments that are sums of nearly
cancelling terms). A checkpoint whose tensors were misplaced, transposed or left out, or whose moments
or step count did not come back, misses the tolerance by orders of magnitude.
"""

import json
from pathlib import Path

import pytest
import torch
from distributed import run_ranks
from safetensors.torch import load_file

from threefold.checkpoint import load_checkpoint, save_checkpoint
from threefold.config import build_config
from threefold.parallel.layers import gather_full
from threefold.parallel.mesh import build_mesh
from threefold.train import build, train_step, wait_params

ASSETS = Path(__file__).parent / "assets"


def _config(tp: int, dp: int, zero: bool):
    return build_config({
        "model": dict(arch="llama", vocab_size=64, hidden_size=16, num_layers=2, num_heads=4,
                      num_kv_heads=2, ffn_hidden_size=32, max_seq_len=16),
        "parallel": dict(tp_size=tp, dp_size=dp, zero=zero),
        "data": dict(path="unused", seq_len=8),
        "optimizer": dict(lr=1e-2, warmup_steps=1),
        "training": dict(max_steps=4, global_batch_size=4, micro_batch_size=1, eval_interval=0, seed=3),
        "logging": dict(progress=False, tensorboard=False, plot=False),
    }, check_paths=False)  # fmt: skip


def _load_and_step(rank: int, world: int, config, path: str) -> dict:
    p = config.parallel
    mesh = build_mesh(p.tp_size, p.dp_size, p.pp_size)
    trainer = build(config, mesh, torch.device("cpu"))
    manifest = load_checkpoint(trainer, path)
    named = {n: q for c in trainer.chunks.values() for n, q in c.named_parameters()}
    loaded = {n: gather_full(q, mesh.tp_group) for n, q in named.items()}
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(12))
    mine = tokens[mesh.dp_rank :: mesh.dp_size]
    stats = train_step(trainer, [(x[None, :-1], x[None, 1:]) for x in mine], 2)
    loss, norm = stats.loss, stats.grad_norm
    wait_params(trainer)  # ZeRO: the updated parameters arrive in the background
    after = {n: gather_full(q, mesh.tp_group) for n, q in named.items()}
    return {"step": manifest["step"], "loaded": loaded, "loss": loss.item(), "norm": norm.item(),
            "after": after}  # fmt: skip


@pytest.mark.parametrize("asset", ["ckpt_v2_tp2", "ckpt_v2_dp2_zero"])
@pytest.mark.parametrize("layout", [(1, 1, False), (2, 1, False), (1, 2, True)], ids=["t1", "t2", "d2-zero"])
def test_format2_checkpoint_from_before_the_move_loads(asset, layout):
    expected = load_file(str(ASSETS / asset / "expected.safetensors"))
    results = run_ranks(layout[0] * layout[1], _load_and_step, _config(*layout),
                        str(ASSETS / asset / "step_2"), timeout=120)  # fmt: skip
    for r in results:
        assert r["step"] == 2
        for name, tensor in r["loaded"].items():
            assert torch.equal(tensor, expected[name]), name
        # One more step reproduces the old code's: the Adam moments and step count came back too.
        # (Another layout or processor may sum in another order: float32 rounding, not a format difference.)
        tol = {"rtol": 1e-5, "atol": 1e-7}
        torch.testing.assert_close(torch.tensor(r["loss"]), expected["after::loss"][0], **tol)
        torch.testing.assert_close(torch.tensor(r["norm"]), expected["after::grad_norm"][0], **tol)
        for name, tensor in r["after"].items():
            torch.testing.assert_close(tensor, expected[f"after::{name}"], **tol)


def _batches(seed: int, dp_rank: int, dp_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(seed))
    return [(x[None, :-1], x[None, 1:]) for x in tokens[dp_rank::dp_size]]


def _train_and_save(rank: int, world: int, config, out: str) -> int:
    """What tests/assets/make_v2_checkpoints.py did to make the assets."""
    p = config.parallel
    mesh = build_mesh(p.tp_size, p.dp_size, p.pp_size)
    trainer = build(config, mesh, torch.device("cpu"))
    for step in range(2):
        train_step(trainer, _batches(11, mesh.dp_rank, mesh.dp_size), step)
    save_checkpoint(trainer, out, step=2, consumed_samples=8, keep_last=2)
    return 0


@pytest.mark.parametrize("asset,layout", [("ckpt_v2_tp2", (2, 1, False)), ("ckpt_v2_dp2_zero", (1, 2, True))])
def test_format2_checkpoint_is_written_as_before(asset, layout, tmp_path):
    run_ranks(2, _train_and_save, _config(*layout), str(tmp_path), timeout=120)
    old_dir, new_dir = ASSETS / asset / "step_2", tmp_path / "step_2"
    old, new = (json.loads((d / "manifest.json").read_text()) for d in (old_dir, new_dir))
    for key in ("format_version", "step", "consumed_samples", "optimizer_steps", "layout", "model"):
        assert new[key] == old[key], key
    assert list(new["tensors"].items()) == list(old["tensors"].items())  # the same entries, in order
    assert sorted(new["files"]) == sorted(old["files"])
    for file in old["files"]:
        old_tensors, new_tensors = load_file(str(old_dir / file)), load_file(str(new_dir / file))
        assert list(new_tensors) == list(old_tensors), file
        for key, tensor in old_tensors.items():
            if key.startswith("rng::"):  # the process's RNG state comes from the test runner
                continue
            new = new_tensors[key]
            assert (new.dtype, new.shape) == (tensor.dtype, tensor.shape), f"{file}: {key}"
            if not tensor.is_floating_point():
                assert torch.equal(new, tensor), f"{file}: {key}"
                continue
            # Two steps' float32 rounding (see the module's docstring), on the tensor's own scale.
            scale = tensor.abs().max().item()
            torch.testing.assert_close(new, tensor, rtol=1e-2, atol=1e-4 * scale, msg=f"{file}: {key}")
