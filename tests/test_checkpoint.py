"""Checkpoints: exact resume, loading under another layout, crash safety, and bad checkpoints."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from distributed import assert_same_training, run_ranks, train_merged
from tiny import ckpt_config

import threefold.checkpoint as checkpoint
import threefold.checkpoint.save as checkpoint_save
from threefold.optim import OptimizerState
from threefold.parallel.mesh import build_mesh
from threefold.train import build, train_loader, train_step


def _layout_id(t: tuple) -> str:
    return "t{}p{}d{}v{}".format(*t) + ("-zero" if len(t) > 4 and t[4] else "")


@pytest.mark.parametrize("layout", [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 1, 1), (1, 1, 2, 1), (2, 2, 1, 2),
                                    (1, 1, 2, 1, True), (2, 1, 2, 1, True)], ids=_layout_id)  # fmt: skip
def test_resume_is_bit_exact(sonnets_dataset, tmp_path, whole_run, layout):
    whole, saved = whole_run(layout)
    assert (saved / "latest").read_text().strip() == "step_4"
    resumed = train_merged(ckpt_config(sonnets_dataset, tmp_path / "b", *layout, load=str(saved / "step_2")))
    assert_same_training(resumed, whole, from_step=2)  # steps 3 and 4, bit for bit


PAIRS = [
    ((2, 1, 1, 1), (1, 1, 1, 1)),
    ((1, 2, 1, 1), (1, 4, 1, 1)),
    ((1, 1, 2, 1), (1, 1, 1, 1)),
    ((1, 2, 1, 1), (1, 2, 1, 2)),
    ((1, 1, 1, 1), (2, 2, 1, 1)),
    ((2, 2, 1, 2), (1, 1, 2, 1)),
    ((1, 1, 2, 1, True), (1, 1, 1, 1)),  # ZeRO shards joined
    ((1, 1, 4, 1, True), (2, 1, 2, 1, True)),  # ZeRO shards re-split
    ((1, 2, 1, 1), (1, 2, 2, 1, True)),  # into ZeRO
]


@pytest.mark.parametrize("before,after", PAIRS, ids=_layout_id)
def test_checkpoint_loads_under_another_layout(sonnets_dataset, tmp_path, whole_run, before, after):
    whole, saved = whole_run(before)
    step_2 = str(saved / "step_2")
    moved = train_merged(ckpt_config(sonnets_dataset, tmp_path / "b", *after, load=step_2))
    assert_same_training(moved, whole, from_step=2, exact=False)


def test_run_resumes_from_its_own_latest(sonnets_dataset, tmp_path, whole_run):
    whole, _ = whole_run((1, 1, 1, 1))
    train_merged(ckpt_config(sonnets_dataset, tmp_path / "b", max_steps=2))  # "crashes" after step 2 ...
    again = train_merged(ckpt_config(sonnets_dataset, tmp_path / "b"))  # ... and is started again
    assert_same_training(again, whole, from_step=2)


def _crash_mid_save(rank: int, world: int, config) -> dict:
    mesh = build_mesh(1, 1, 1)
    trainer = build(config, mesh, torch.device("cpu"))
    root = Path(config.checkpoint.dir)
    checkpoint.save_checkpoint(trainer, root, step=2, consumed_samples=16, keep_last=3)
    original = checkpoint_save.save_file

    def dying_save(*args, **kwargs):
        original(*args, **kwargs)
        raise OSError("disk full (simulated)")

    checkpoint_save.save_file = dying_save
    try:
        checkpoint.save_checkpoint(trainer, root, step=3, consumed_samples=24, keep_last=3)
    except OSError:
        pass
    finally:
        checkpoint_save.save_file = original
    manifest = checkpoint.load_checkpoint(trainer, checkpoint.latest_checkpoint(root))
    return {"latest": (root / "latest").read_text().strip(), "step": manifest["step"],
            "dirs": sorted(p.name for p in root.iterdir())}  # fmt: skip


def test_crash_mid_save_keeps_the_last_good_checkpoint(sonnets_dataset, tmp_path):
    result = run_ranks(1, _crash_mid_save, ckpt_config(sonnets_dataset, tmp_path))[0]
    assert result["latest"] == "step_2" and result["step"] == 2
    assert "step_3" not in result["dirs"]


def _load_bad(rank: int, world: int, config, path: str) -> str:
    mesh = build_mesh(1, 1, 1)
    trainer = build(config, mesh, torch.device("cpu"))
    before = [p.detach().clone() for chunk in trainer.chunks.values() for p in chunk.parameters()]
    try:
        checkpoint.load_checkpoint(trainer, path)
    except ValueError as e:
        after = [p.detach() for chunk in trainer.chunks.values() for p in chunk.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "state changed"
        return str(e)
    return "no error"


@pytest.fixture(scope="module")
def good_checkpoint(sonnets_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("good")
    train_merged(ckpt_config(sonnets_dataset, run, max_steps=2))
    return run / "ckpt" / "step_2"


def _damaged(good: Path, tmp_path: Path, damage) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    damage(bad)
    return bad


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _set_version(path: Path) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "rank00000.safetensors").unlink(), r"lacks rank00000.safetensors"),
        (
            lambda d: _truncate(d / "rank00000.safetensors"),
            r"rank00000.safetensors' does not match its checksum",
        ),
        (
            lambda d: _flip_byte(d / "rank00000.safetensors"),
            r"rank00000.safetensors' does not match its checksum",
        ),
        (_set_version, r"has format version 99; this threefold reads \(1, 2\)"),
        (lambda d: (d / "manifest.json").unlink(), r"is not a checkpoint: no manifest.json"),
    ],
    ids=["missing-shard", "truncated", "checksum", "version", "no-manifest"],
)
def test_bad_checkpoint_is_refused_before_anything_changes(
    sonnets_dataset, tmp_path, good_checkpoint, damage, message
):
    bad = _damaged(good_checkpoint, tmp_path, damage)
    error = run_ranks(1, _load_bad, ckpt_config(sonnets_dataset, tmp_path), str(bad))[0]
    assert __import__("re").search(message, error), error


def test_other_model_shape_is_refused(sonnets_dataset, tmp_path, good_checkpoint):
    error = run_ranks(1, _load_bad, ckpt_config(sonnets_dataset, tmp_path, hidden=64), str(good_checkpoint))[
        0
    ]
    assert "holds another model shape" in error and "'hidden_size': (32, 64)" in error


def _saved_before_the_first_step(rank: int, world: int, config, other_seed) -> dict:
    mesh = build_mesh(1, 1, 1)
    fresh = build(config, mesh, torch.device("cpu"))
    path = checkpoint.save_checkpoint(fresh, config.checkpoint.dir, step=0, consumed_samples=0, keep_last=3)
    keys = list(json.loads((path / "manifest.json").read_text())["tensors"])
    # Other weights, and a step taken: Adam has moments that the checkpoint must not leave behind.
    other = build(other_seed, mesh, torch.device("cpu"))
    batches = train_loader(config, mesh).next_batch()
    train_step(other, batches, 0)
    checkpoint.load_checkpoint(other, path)
    losses = [float(train_step(t, batches, 0).loss) for t in (fresh, other)]
    weights = [{n: p.detach().clone() for c in t.chunks.values() for n, p in c.named_parameters()}
               for t in (fresh, other)]  # fmt: skip
    return {"keys": keys, "losses": losses, "weights": weights}


def test_checkpoint_saved_before_the_first_step_loads(sonnets_dataset, tmp_path):
    """No moments yet: the checkpoint holds weights only, and loading it starts the optimizer afresh."""
    config = ckpt_config(sonnets_dataset, tmp_path)
    r = run_ranks(1, _saved_before_the_first_step, config, ckpt_config(sonnets_dataset, tmp_path, seed=6))[0]
    assert r["keys"] and not [k for k in r["keys"] if "::" in k]
    assert r["losses"][0] == r["losses"][1]
    for name, w in r["weights"][0].items():
        assert torch.equal(r["weights"][1][name], w), name


class _MomentsRenamed:
    """An optimizer part that keeps its moments under other names, as another optimizer would."""

    def __init__(self, inner):
        self.inner = inner

    def state_dict(self) -> OptimizerState:
        state = self.inner.state_dict()
        renamed = {n: replace(s, moments={f"sgd_{k}": v for k, v in s.moments.items()})
                   for n, s in state.params.items()}  # fmt: skip
        return replace(state, params=renamed)


def _save_with_another_optimizer(rank: int, world: int, config) -> str:
    mesh = build_mesh(1, 1, 1)
    trainer = build(config, mesh, torch.device("cpu"))
    train_step(trainer, train_loader(config, mesh).next_batch(), 0)
    trainer.optimizer = _MomentsRenamed(trainer.optimizer)
    path = checkpoint.save_checkpoint(trainer, config.checkpoint.dir, step=1, consumed_samples=8, keep_last=3)
    return str(path)


def test_optimizer_state_of_another_optimizer_is_refused(sonnets_dataset, tmp_path):
    """A checkpoint stores what the optimizer hands it; the loading optimizer refuses what it doesn't keep."""
    config = ckpt_config(sonnets_dataset, tmp_path)
    path = run_ranks(1, _save_with_another_optimizer, config)[0]
    assert (
        "embed_tokens.weight::sgd_exp_avg"
        in json.loads((Path(path) / "manifest.json").read_text())["tensors"]
    )
    error = run_ranks(1, _load_bad, config, path)[0]
    assert "holds ['sgd_exp_avg', 'sgd_exp_avg_sq']; this optimizer keeps ['exp_avg', 'exp_avg_sq']" in error


def test_asynchronous_save_resumes_bit_exact(sonnets_dataset, tmp_path):
    whole = train_merged(ckpt_config(sonnets_dataset, tmp_path / "a", 1, 2, 1, 1, asynchronous=True))
    ckpt = tmp_path / "a" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir() if p.name != ".lock") == [
        "latest",
        "step_2",
        "step_4",
    ]  # both committed
    resumed = train_merged(
        ckpt_config(sonnets_dataset, tmp_path / "b", 1, 2, 1, 1, load=str(ckpt / "step_2"))
    )
    assert_same_training(resumed, whole, from_step=2)
    blocked = [
        json.loads(line) for line in (tmp_path / "a" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in blocked if "checkpoint/blocking_seconds" in r] == [2, 4]


CONVERT = [((1, 1, 2, 1, True), (2, 2, 1, 1)), ((2, 2, 1, 2), (1, 1, 2, 1, True))]


@pytest.mark.parametrize("before,after", CONVERT, ids=_layout_id)
def test_converted_checkpoint_resumes_under_another_layout(
    sonnets_dataset, tmp_path, whole_run, before, after
):
    """`threefold checkpoint convert`: one file of full weights and moments that resumes like the original."""
    whole, saved = whole_run(before)
    merged = tmp_path / "merged"
    cli = [sys.executable, "-m", "threefold", "checkpoint", "convert", str(saved)]
    cli.append(str(merged))
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["layout"] == {"tp_size": 1, "pp_size": 1, "dp_size": 1, "num_model_chunks": 1}
    assert manifest["step"] == 4 and sorted(p.name for p in merged.iterdir()) == [
        "manifest.json",
        "rank00000.safetensors",
    ]
    step_2 = tmp_path / "merged2"
    checkpoint.convert_checkpoint(saved / "step_2", step_2)
    moved = train_merged(ckpt_config(sonnets_dataset, tmp_path / "b", *after, load=str(step_2)))
    assert_same_training(moved, whole, from_step=2, exact=False)


def test_convert_refuses_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "src").mkdir()
    cli = [sys.executable, "-m", "threefold", "checkpoint", "convert", str(tmp_path / "src")]
    cli.append(str(tmp_path / "o"))
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is not a checkpoint: no manifest.json" in proc.stderr
    assert not (tmp_path / "o").exists()
