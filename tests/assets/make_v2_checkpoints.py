"""How tests/assets/ckpt_v2_* were made, with the code of commit ace3ee7 (before the subpackages).

Kept for the record: the imports are the old flat module names, so this runs only at ace3ee7
(`python tests/assets/make_v2_checkpoints.py` from the repository root). It trains two steps on fixed
tokens under tp=2 and under dp=2 with ZeRO, saves each (format version 2), then loads each into one
process and writes expected.safetensors: the full weights, the Adam moments, and the loss, gradient norm
and weights after one more step on other fixed tokens.
"""

import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, "tests")
from distributed import run_ranks  # noqa: E402
from threefold.mesh import build_mesh  # noqa: E402

from threefold.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from threefold.config import build_config  # noqa: E402
from threefold.train import build, train_step  # noqa: E402

LAYOUTS = {"ckpt_v2_tp2": (2, 1, False), "ckpt_v2_dp2_zero": (1, 2, True)}


def config(tp: int, dp: int, zero: bool):
    return build_config({
        "model": dict(arch="llama", vocab_size=64, hidden_size=16, num_layers=2, num_heads=4,
                      num_kv_heads=2, ffn_hidden_size=32, max_seq_len=16),
        "parallel": dict(tp_size=tp, dp_size=dp, zero=zero),
        "data": dict(path="unused", seq_len=8),
        "optimizer": dict(lr=1e-2, warmup_steps=1),
        "training": dict(max_steps=4, global_batch_size=4, micro_batch_size=1, eval_interval=0, seed=3),
        "logging": dict(progress=False, tensorboard=False, plot=False),
    }, check_paths=False)  # fmt: skip


def batches(seed: int, dp_rank: int = 0, dp_size: int = 1):
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(seed))
    return [(x[None, :-1], x[None, 1:]) for x in tokens[dp_rank::dp_size]]


def save(rank, world, cfg, out):
    p = cfg.parallel
    mesh = build_mesh(p.tp_size, p.dp_size, p.pp_size)
    trainer = build(cfg, mesh, torch.device("cpu"))
    for step in range(2):
        train_step(trainer, batches(11, mesh.dp_rank, mesh.dp_size), step)
    save_checkpoint(trainer, out, step=2, consumed_samples=8, keep_last=2)
    return 0


def expected(rank, world, cfg, path):
    trainer = build(cfg, build_mesh(1, 1, 1), torch.device("cpu"))
    load_checkpoint(trainer, path)
    named = {n: p for c in trainer.chunks.values() for n, p in c.named_parameters()}
    names = {id(p): n for n, p in named.items()}
    out = {}
    for i, (p, _, _) in enumerate(trainer.optimizer.ranges):
        out[names[id(p)]] = p.detach().clone()
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"{names[id(p)]}::{k}"] = trainer.optimizer.state_of(i)[k].view(p.shape).clone()
    stats = train_step(trainer, batches(12), 2)
    loss, norm = stats.loss, stats.grad_norm
    out["after::loss"], out["after::grad_norm"] = loss.reshape(1).clone(), norm.reshape(1).clone()
    out |= {f"after::{n}": p.detach().clone() for n, p in named.items()}
    return out


if __name__ == "__main__":
    for name, (tp, dp, zero) in LAYOUTS.items():
        run_ranks(tp * dp, save, config(tp, dp, zero), f"tests/assets/{name}", timeout=60)
        [out] = run_ranks(1, expected, config(1, 1, False), f"tests/assets/{name}/step_2", timeout=60)
        save_file({k: v.contiguous() for k, v in out.items()}, f"tests/assets/{name}/expected.safetensors")
