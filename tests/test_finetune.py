"""Where a run starts: its own checkpoints, else `checkpoint.load` (resume or weights only), else scratch.

A fine-tune (load_mode = "weights") is compared with a reference built by hand: a fresh trainer given the
checkpoint's weights, trained from step 0 on the data from its start. Resuming from an older step is a
branch (load + load_step into a new dir), compared with the original run's later steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed import run_ranks, train_and_gather
from tiny import tiny_config

from threefold.checkpoint import load_manifest, read_full_state
from threefold.checkpoint.load import ShardReader
from threefold.checkpoint.parts import named_parameters
from threefold.config import CheckpointConfig
from threefold.config.validate import checkpoint_to_load
from threefold.parallel.mesh import build_mesh
from threefold.reliability.events import read_events
from threefold.train import build, train_loader, train_step

STEPS = 4
BATCH = 8  # tiny_config's global batch: samples per step


def _config(data: Path, run: Path, *, dp: int = 1, zero: bool = False, max_steps: int = STEPS, **checkpoint):
    return tiny_config(data, run, dp=dp, zero=zero, training=dict(max_steps=max_steps, seed=5),
                       checkpoint=dict(interval=2, keep_last=3) | checkpoint)  # fmt: skip


def _train(config) -> dict:
    return run_ranks(1, train_and_gather, config, timeout=240)[0]


@pytest.fixture(scope="module")
def pretrained(sonnets_dataset, tmp_path_factory) -> tuple[Path, dict]:
    """A 4-step run saving steps 2 and 4 (`latest`: step_4): its checkpoint directory and its result."""
    run = tmp_path_factory.mktemp("pretrained")
    return run / "ckpt", _train(_config(sonnets_dataset, run))


@pytest.fixture(scope="module")
def fine_tuned(sonnets_dataset, tmp_path_factory, pretrained) -> dict:
    """4 steps fine-tuned from the pretrained run's latest checkpoint (its directory given as load)."""
    run = tmp_path_factory.mktemp("fine-tuned")
    return _train(_config(sonnets_dataset, run, load=str(pretrained[0]), load_mode="weights"))


# --- What resume() leaves in the trainer, before the first step -----------------------------------------


def _start(rank: int, world: int, config) -> dict:
    from threefold.reliability.control import ControlChannel
    from threefold.reliability.events import EventLog
    from threefold.reliability.runguard import resume

    p = config.parallel
    trainer = build(config, build_mesh(p.tp_size, p.dp_size, p.pp_size), torch.device("cpu"))
    loader = train_loader(config, trainer.mesh)
    start = resume(trainer, loader, ControlChannel(), EventLog(config.logging.out_dir, rank=rank))
    state = trainer.optimizer.state_dict()
    return {
        "start": (start.step, start.how, start.saved_step, str(start.path)),
        "consumed": loader.consumed_samples,
        "optimizer_steps": state.step,
        "slices": {n: (s.start, s.end, {k: v.clone() for k, v in s.moments.items()})
                   for n, s in state.params.items()},
        "weights": {n: p.detach().clone() for n, p in named_parameters(trainer).items()},
    }  # fmt: skip


@pytest.mark.parametrize("mode", ["weights", "resume"])
def test_load_mode_sets_weights_moments_step_and_data_position(sonnets_dataset, tmp_path, pretrained, mode):
    """Under ZeRO over 2 ranks, so that each rank's optimizer holds a slice of the moments."""
    root, _ = pretrained
    step_4 = root / "step_4"
    config = _config(sonnets_dataset, tmp_path, dp=2, zero=True, load=str(root), load_mode=mode)
    ranks = run_ranks(2, _start, config)
    _, saved = read_full_state(step_4)
    reader = ShardReader(step_4, load_manifest(step_4))
    for r in ranks:
        for name, w in saved.items():
            assert torch.equal(r["weights"][name], w), name
        if mode == "weights":
            assert r["start"] == (0, "weights", 4, str(step_4))
            assert r["consumed"] == 0 and r["optimizer_steps"] == 0.0
            assert all(moments == {} for _, _, moments in r["slices"].values())
        else:
            assert r["start"] == (4, "loaded", 4, str(step_4))
            assert r["consumed"] == 4 * BATCH and r["optimizer_steps"] == 4.0
            for name, (start, end, moments) in r["slices"].items():
                assert sorted(moments) == ["exp_avg", "exp_avg_sq"], name
                for k, v in moments.items():
                    assert torch.equal(v, reader.full(f"{name}::{k}").reshape(-1)[start:end]), (name, k)
    assert sum(len(r["slices"]) for r in ranks) >= len(saved), "ZeRO splits the parameters between ranks"


# --- Fine-tuning: the loop from step 0 ------------------------------------------------------------------


def _reference_fine_tune(rank: int, world: int, config, step: str) -> dict:
    """A fresh trainer and data loader (no `load`), the checkpoint's weights copied in by hand."""
    trainer = build(config, build_mesh(1, 1, 1), torch.device("cpu"))
    _, saved = read_full_state(step)
    with torch.no_grad():
        for name, p in named_parameters(trainer).items():
            p.copy_(saved[name])  # in float32 the optimizer's master is the parameter itself
    loader = train_loader(config, trainer.mesh)
    losses = [train_step(trainer, loader.next_batch(), s).read().loss for s in range(STEPS)]
    return {
        "losses": losses,
        "weights": {n: p.detach().clone() for n, p in named_parameters(trainer).items()},
    }


def test_fine_tune_equals_a_fresh_run_from_the_checkpoint_weights(
    sonnets_dataset, tmp_path, pretrained, fine_tuned
):
    root, before = pretrained
    reference = run_ranks(1, _reference_fine_tune, _config(sonnets_dataset, tmp_path), str(root / "step_4"))[
        0
    ]
    assert len(fine_tuned["losses"]) == STEPS  # from step 0, not from the checkpoint's step 4
    assert fine_tuned["losses"] == reference["losses"]  # bit for bit: fresh Adam, lr schedule and data
    assert fine_tuned["losses"][0] < before["losses"][0], "it started from the trained weights"
    for name, w in reference["weights"].items():
        assert torch.equal(fine_tuned["weights"][name], w), name


def test_fine_tune_says_what_it_loaded(sonnets_dataset, tmp_path, pretrained, capfd):
    root, _ = pretrained
    _train(_config(sonnets_dataset, tmp_path, max_steps=1, load=str(root), load_mode="weights"))
    out = capfd.readouterr().out
    assert f"loaded the weights of {root / 'step_4'} (saved at step 4) for fine-tuning" in out, out
    (event,) = [e for e in read_events(tmp_path / "logs") if e["event"] in ("load", "resume")]
    assert (event["event"], event["step"], event["mode"]) == ("load", 4, "weights")


def test_a_restarted_fine_tune_continues_itself(sonnets_dataset, tmp_path, pretrained, fine_tuned, capfd):
    """Its own checkpoints come first: the restart resumes the fine-tune instead of starting it over."""
    load = dict(load=str(pretrained[0]), load_mode="weights")
    _train(_config(sonnets_dataset, tmp_path, max_steps=2, **load))  # "crashes" after step 2 ...
    capfd.readouterr()
    again = _train(_config(sonnets_dataset, tmp_path, **load))  # ... and is started again, same command
    assert again["losses"] == fine_tuned["losses"][2:]
    for name, w in fine_tuned["weights"].items():
        assert torch.equal(again["weights"][name], w), name
    out = capfd.readouterr().out
    assert f"resumed from {tmp_path / 'ckpt' / 'step_2'} (step 2, {2 * BATCH} samples consumed)" in out, out


def test_resuming_from_an_older_step_is_a_branch(sonnets_dataset, tmp_path, pretrained, capfd):
    root, whole = pretrained
    branch = _train(_config(sonnets_dataset, tmp_path, load=str(root), load_step=2))
    assert branch["losses"] == whole["losses"][2:]  # steps 3 and 4 of the original, bit for bit
    for name, w in whole["weights"].items():
        assert torch.equal(branch["weights"][name], w), name
    assert (root / "latest").read_text().strip() == "step_4", "the original run is left as it was"
    line = f"resumed from {root / 'step_2'} (checkpoint.load: step 2, {2 * BATCH} samples consumed)"
    assert line in capfd.readouterr().out


def test_a_finished_run_started_again_says_there_is_nothing_to_train(sonnets_dataset, tmp_path, capfd):
    config = _config(sonnets_dataset, tmp_path, max_steps=2)
    first = _train(config)
    capfd.readouterr()
    again = _train(config)
    assert len(first["losses"]) == 2 and again["losses"] == []
    for name, w in first["weights"].items():
        assert torch.equal(again["weights"][name], w), name
    out = capfd.readouterr().out
    assert f"resumed from {tmp_path / 'ckpt' / 'step_2'} (step 2, " in out, out
    assert "training.max_steps (2) is reached already, so there is nothing to train" in out, out


# --- Which checkpoint `load` names, checked before any worker starts ------------------------------------


def _run_dir(root: Path, steps: list[int], latest: str | None = None) -> Path:
    for step in steps:
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "manifest.json").write_text("{}")
    if latest is not None:
        (root / "latest").write_text(latest)
    return root


def test_load_names_one_checkpoint(tmp_path):
    root = _run_dir(tmp_path / "ckpt", [2, 4, 6], latest="step_4")
    assert checkpoint_to_load(CheckpointConfig(load=str(root))) == root / "step_4"
    assert checkpoint_to_load(CheckpointConfig(load=str(root), load_step=6)) == root / "step_6"
    assert checkpoint_to_load(CheckpointConfig(load=str(root / "step_2"))) == root / "step_2"
    (root / "latest").unlink()
    assert checkpoint_to_load(CheckpointConfig(load=str(root))) == root / "step_6", "no `latest`: the newest"


@pytest.mark.parametrize(
    "load,step,latest,message",
    [
        ("ckpt", 5, None, r"load_step \(5\): '.*ckpt' holds no step_5; its steps are \[2, 4\]"),
        ("ckpt/step_2", 2, None, r"is one checkpoint \(it holds manifest.json\), so .*load_step \(2\)"),
        ("elsewhere", None, None, r"neither a checkpoint \(no manifest.json\) nor a run's checkpoint dir"),
        ("ckpt", None, "../../etc", r"points to '../../etc', which is not a directory inside"),
        ("ckpt", None, "step_9", r"step_9' \(checkpoint.load\) holds no manifest.json"),
    ],
)  # fmt: skip
def test_a_bad_load_is_refused_naming_what_is_there(tmp_path, load, step, latest, message):
    _run_dir(tmp_path / "ckpt", [2, 4], latest=latest)
    with pytest.raises(ValueError, match=message):
        checkpoint_to_load(CheckpointConfig(load=str(tmp_path / load), load_step=step))


@pytest.mark.parametrize(
    "checkpoint,message",
    [
        (dict(load_step=3), r"checkpoint.load_step \(3\) needs checkpoint.load"),
        (dict(load_mode="weights"), r"checkpoint.load_mode = 'weights' needs checkpoint.load"),
        (dict(load="x", load_mode="optimizer"), r"checkpoint.load_mode 'optimizer' is unknown"),
        (dict(load="x", load_step=-1), r"checkpoint.load_step must be >= 0"),
    ],
)  # fmt: skip
def test_load_options_without_their_load_are_refused(checkpoint, message):
    with pytest.raises(ValueError, match=message):
        CheckpointConfig(**checkpoint).check()


def test_load_inside_the_runs_own_dir_is_refused(sonnets_dataset, tmp_path):
    _run_dir(tmp_path / "ckpt", [2, 4], latest="step_4")
    with pytest.raises(ValueError, match=r"lies in this run's own checkpoint.dir .* branch the run"):
        _config(sonnets_dataset, tmp_path, load=str(tmp_path / "ckpt" / "step_2"))


def test_a_run_with_checkpoints_of_its_own_never_reads_load(sonnets_dataset, tmp_path):
    """A restarted fine-tune resumes from its own checkpoints even after its `load` has been deleted."""
    gone = str(tmp_path / "deleted-pretrained-run")
    with pytest.raises(ValueError, match="neither a checkpoint"):
        _config(sonnets_dataset, tmp_path, load=gone, load_mode="weights")  # a fresh run needs it
    _run_dir(tmp_path / "ckpt", [2], latest="step_2")
    assert _config(sonnets_dataset, tmp_path, load=gone, load_mode="weights").checkpoint.load == gone
