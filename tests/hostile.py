"""Shared pieces of the hostile-input tests (test_hostile.py, test_hostile_fuzz.py): the committed format-2
checkpoints to damage, their model's config, and a recorder of every file a reader opens."""

import json
import shutil
from pathlib import Path

import torch

import threefold.checkpoint.load as checkpoint_load
import threefold.checkpoint.manifest as checkpoint_manifest
import threefold.model.hf as hf
from threefold.config import build_config
from threefold.parallel.mesh import build_mesh
from threefold.train import build

ASSETS = Path(__file__).parent / "assets"
TP2 = ASSETS / "ckpt_v2_tp2" / "step_2"
ZERO = ASSETS / "ckpt_v2_dp2_zero" / "step_2"
RANK0 = "rank00000.safetensors"


def asset_config(root: Path, dp: int = 1):
    """The model of the assets (tests/test_checkpoint_compat.py), saving under `root`."""
    return build_config({
        "model": dict(arch="llama", vocab_size=64, hidden_size=16, num_layers=2, num_heads=4,
                      num_kv_heads=2, ffn_hidden_size=32, max_seq_len=16),
        "parallel": dict(dp_size=dp),
        "data": dict(path="unused", seq_len=8),
        "training": dict(max_steps=4, global_batch_size=4, micro_batch_size=1, eval_interval=0),
        "logging": dict(progress=False, tensorboard=False, plot=False, out_dir=str(root / "logs")),
        "checkpoint": dict(dir=str(root / "ckpt"), keep_last=5),
    }, check_paths=False)  # fmt: skip


def build_trainer(config):
    p = config.parallel
    return build(config, build_mesh(p.tp_size, p.dp_size, p.pp_size), torch.device("cpu"))


def copy_checkpoint(src: Path, run: Path) -> Path:
    """`src` as step_2 of run/ckpt, with `latest` naming it."""
    step = run / "ckpt" / "step_2"
    shutil.copytree(src, step)
    (step.parent / "latest").write_text("step_2\n")
    return step


def manifest_of(step: Path) -> dict:
    return json.loads((step / "manifest.json").read_text())


def write_manifest(step: Path, manifest: dict) -> None:
    (step / "manifest.json").write_text(json.dumps(manifest))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def record_opens(seen: list[Path], setattr) -> None:
    """Every checkpoint file hashed or opened, and every HF weights file loaded, goes into `seen`."""
    for module, name in ((checkpoint_manifest, "sha256"), (checkpoint_load, "safe_open"), (hf, "load_file")):
        real = getattr(module, name)

        def spy(path, *args, _real=real, **kwargs):
            seen.append(Path(path))
            return _real(path, *args, **kwargs)

        setattr(module, name, spy)


def edit(step: Path, change) -> None:
    manifest = manifest_of(step)
    change(manifest)
    write_manifest(step, manifest)
