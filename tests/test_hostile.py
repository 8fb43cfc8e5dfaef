"""Hostile inputs: checkpoints, Hugging Face directories, `latest` pointers and dataset metadata that are
damaged or crafted; outputs that would overwrite their inputs; a full disk mid-save.

Each must end in a ValueError that names the file and the key (an OSError for the disk), with nothing read
outside the directory it belongs to and nothing of value lost. The checkpoints are the committed format-2
assets (tp=2, and dp=2 with ZeRO shards): small, real, and what older threefold wrote. Fuzzed manifests:
test_hostile_fuzz.py.
"""

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import run_ranks
from hostile import (
    RANK0,
    TP2,
    asset_config,
    build_trainer,
    copy_checkpoint,
    edit,
    manifest_of,
    record_opens,
    tree,
    write_manifest,
)

import threefold.checkpoint.manifest as checkpoint_manifest
import threefold.checkpoint.save as checkpoint_save
import threefold.files as files
import threefold.model.hf as hf
from threefold.checkpoint import (
    Checkpointer,
    checkpoints_newest_first,
    convert_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_full_state,
    save_checkpoint,
)
from threefold.cli import main
from threefold.config import ModelConfig
from threefold.data.dataset import check_dataset, read_meta


@pytest.fixture
def opened(monkeypatch) -> list[Path]:
    seen: list[Path] = []
    record_opens(seen, monkeypatch.setattr)
    return seen


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    """The tp=2 asset exported as a Hugging Face checkpoint in several indexed shards."""
    fields, state = read_full_state(TP2)
    return hf.save_hf_checkpoint(ModelConfig(**fields), state, tmp_path / "hf", max_shard_bytes=8192)


# --- 1. Names that leave their directory --------------------------------------------------------------


def _escape(step: Path, how: str) -> None:
    """Make the manifest's first file live outside the checkpoint (a valid copy, with its checksum)."""
    outside = step.parent.parent / "outside.safetensors"
    shutil.copy(step / RANK0, outside)
    (step / RANK0).unlink()
    if how == "symlink":
        (step / RANK0).symlink_to(outside)
        return
    name = "../../outside.safetensors" if how == "dotdot" else str(outside)
    manifest = manifest_of(step)
    manifest["files"][name] = manifest["files"].pop(RANK0)
    for entries in manifest["tensors"].values():
        for e in entries:
            e["file"] = name if e["file"] == RANK0 else e["file"]
    write_manifest(step, manifest)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("reader", ["read_full_state", "convert"])
def test_manifest_naming_a_file_outside_is_refused_before_it_is_opened(tmp_path, opened, how, reader):
    step = copy_checkpoint(TP2, tmp_path / "run")
    _escape(step, how)
    with pytest.raises(ValueError, match=r"leaves its directory|a symlink leaving the directory"):
        read_full_state(step) if reader == "read_full_state" else convert_checkpoint(step, tmp_path / "out")
    assert opened == [], "nothing is hashed or opened before every name is checked"
    assert not (tmp_path / "out").exists()


def _move_first_shard(hf_dir: Path, how: str) -> None:
    index = json.loads((hf_dir / hf.INDEX_NAME).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    other = hf_dir.parent / "other"
    other.mkdir()
    shutil.move(hf_dir / first, other / first)
    if how == "symlink":
        (hf_dir / first).symlink_to(other / first)
        return
    index["weight_map"] = {
        k: f"../other/{first}" if v == first else v for k, v in index["weight_map"].items()
    }
    (hf_dir / hf.INDEX_NAME).write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
def test_hf_index_naming_a_shard_outside_is_refused(hf_dir, opened, how):
    _move_first_shard(hf_dir, how)
    with pytest.raises(ValueError, match=r"leaves its directory|a symlink leaving the directory"):
        hf.load_hf_checkpoint(hf_dir)
    assert opened == []


def test_hf_hub_cache_snapshot_linking_into_its_blobs_loads(tmp_path, hf_dir):
    """The hub cache keeps files in blobs/ and symlinks to them from snapshots/<revision>/."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for file in hf_dir.iterdir():
        shutil.copy(file, repo / "blobs" / f"{file.name}.blob")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"{file.name}.blob")
    cfg, state = hf.load_hf_checkpoint(snapshot)
    expected_cfg, expected = hf.load_hf_checkpoint(hf_dir)
    assert cfg == expected_cfg and all(torch.equal(state[k], expected[k]) for k in expected)
    shard = sorted(snapshot.glob("model-*.safetensors"))[0]
    shard.unlink()  # a link leaving the repository is still refused
    shard.symlink_to(hf_dir / shard.name)
    with pytest.raises(ValueError, match="a symlink leaving the directory"):
        hf.load_hf_checkpoint(snapshot)


def test_latest_pointing_outside_the_run_is_refused(tmp_path, capsys):
    step = copy_checkpoint(TP2, tmp_path / "run")
    shutil.copytree(TP2, tmp_path / "elsewhere")
    (step.parent / "latest").write_text("../../elsewhere\n")
    with pytest.raises(ValueError, match=r"points to '\.\./\.\./elsewhere'.*refusing to follow it"):
        latest_checkpoint(step.parent)
    assert checkpoints_newest_first(step.parent) == [step]  # resume never follows it either
    assert main(["export-hf", str(step.parent), str(tmp_path / "out")]) == 2
    assert "refusing to follow it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- 2. Outputs that would replace something ----------------------------------------------------------


def test_export_refuses_a_non_empty_directory_unless_overwrite(tmp_path, capsys):
    step = copy_checkpoint(TP2, tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export-hf", str(step), str(out)]) == 2
    assert "is not empty (notes.txt); pass --overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    assert main(["export-hf", str(step), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"], "no temporary directory left"


@pytest.mark.parametrize("target", ["run", "ckpt", "step"])
def test_export_never_replaces_its_own_checkpoint(tmp_path, capsys, target):
    step = copy_checkpoint(TP2, tmp_path / "run")
    before = tree(tmp_path / "run")
    out = {"run": tmp_path / "run", "ckpt": step.parent, "step": step}[target]
    assert main(["export-hf", str(step.parent), str(out), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert tree(tmp_path / "run") == before


def test_import_refuses_a_non_empty_output_and_never_replaces_its_input(tmp_path, hf_dir, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "x").write_text("x")
    assert main(["import-hf", str(hf_dir), str(out)]) == 2
    assert "is not empty (x); pass --overwrite" in capsys.readouterr().err
    before = tree(hf_dir)
    assert main(["import-hf", str(hf_dir), str(hf_dir), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err and tree(hf_dir) == before
    assert main(["import-hf", str(hf_dir), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.toml", RANK0]


def test_convert_replaces_an_existing_checkpoint_only_with_overwrite(tmp_path, capsys):
    step = copy_checkpoint(TP2, tmp_path / "run")
    dst = tmp_path / "merged"
    convert = ["checkpoint", "convert", str(step), str(dst)]
    assert main(convert) == 0
    first = tree(dst)
    assert main(convert) == 2
    assert "is not empty (manifest.json, rank00000.safetensors); pass --overwrite" in capsys.readouterr().err
    assert main([*convert, "--overwrite"]) == 0 and tree(dst) == first
    before = tree(step)
    assert main(["checkpoint", "convert", str(step), str(step), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err and tree(step) == before


# --- 3. Durable before visible ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "export-hf", "import-hf"])
def test_outputs_are_fsynced_before_the_rename_that_publishes_them(tmp_path, hf_dir, monkeypatch, command):
    step = copy_checkpoint(TP2, tmp_path / "run")
    out = tmp_path / "out"
    seen = []
    real = files.sync_tree

    def sync_tree(path):
        seen.append((Path(path).name, sorted(p.name for p in Path(path).iterdir()), out.exists()))
        real(path)

    monkeypatch.setattr(files, "sync_tree", sync_tree)
    source = hf_dir if command == "import-hf" else step
    argv = ["checkpoint", "convert"] if command == "convert" else [command]
    assert main([*argv, str(source), str(out)]) == 0
    assert len(seen) == 1
    name, synced, published = seen[0]
    assert name.startswith(".out.tmp-") and not published
    assert synced == sorted(p.name for p in out.iterdir())


def _save_recording(rank: int, world: int, config) -> list:
    trainer = build_trainer(config)
    root = Path(config.checkpoint.dir)
    events: list = []
    real_sync, real_atomic = files.sync_tree, files.write_atomic

    def sync_tree(path):
        path = Path(path)
        events.append(("sync", path.name, sorted(p.name for p in path.iterdir()), (root / "step_2").exists()))
        real_sync(path)

    def write_atomic(path, data):
        named = root / data.strip()
        events.append(("latest", Path(path).name, data.strip(), (named / "manifest.json").is_file()))
        real_atomic(path, data)

    files.sync_tree, checkpoint_save.write_atomic = sync_tree, write_atomic
    save_checkpoint(trainer, root, step=2, consumed_samples=8, keep_last=3)
    return events


def test_checkpoint_is_fsynced_before_its_rename_and_latest_moves_atomically_after(tmp_path):
    events = run_ranks(1, _save_recording, asset_config(tmp_path))[0]
    assert events == [
        ("sync", ".tmp-step_2", ["manifest.json", RANK0], False),  # everything durable, nothing visible
        ("latest", "latest", "step_2", True),  # then `latest`, once the step is in place
    ]


# --- 4. Clear messages instead of tracebacks ----------------------------------------------------------

MANIFEST_DAMAGE = {
    "no-manifest": (lambda d: (d / "manifest.json").unlink(), "is not a checkpoint: no manifest.json"),
    "not-json": (lambda d: (d / "manifest.json").write_text("{"), "manifest.json' is not valid JSON"),
    "no-tensors": (lambda d: edit(d, lambda m: m.pop("tensors")), "manifest.json lacks the key 'tensors'"),
    "no-step": (lambda d: edit(d, lambda m: m.pop("step")), "manifest.json lacks the key 'step'"),
    "step-text": (
        lambda d: edit(d, lambda m: m.update(step="4")),
        "'step' is '4' (str), expected an integer",
    ),
    "files-list": (
        lambda d: edit(d, lambda m: m.update(files=[RANK0])),
        "'files' is list, expected an object",
    ),
    "entry-shape": (
        lambda d: edit(d, lambda m: m["tensors"]["norm.weight"][0].update(shape="16")),
        r"tensors['norm.weight'][0].shape is '16' (str), expected a list of sizes",
    ),
}


@pytest.mark.parametrize("damage", [k for k in MANIFEST_DAMAGE if k != "no-manifest"])
def test_malformed_manifest_names_the_checkpoint_and_the_key(tmp_path, damage):
    step = copy_checkpoint(TP2, tmp_path / "run")
    apply, message = MANIFEST_DAMAGE[damage]
    apply(step)
    with pytest.raises(ValueError) as e:
        read_full_state(step)
    assert str(step) in str(e.value) and message in str(e.value)


class _Loader:
    def load_state_dict(self, state: dict) -> None:
        self.state = state


def _resume_past_damage(rank: int, world: int, config) -> dict:
    from threefold.reliability.control import ControlChannel
    from threefold.reliability.events import EventLog, read_events
    from threefold.reliability.runguard import resume

    trainer = build_trainer(config)
    root = Path(config.checkpoint.dir)
    save_checkpoint(trainer, root, step=2, consumed_samples=8, keep_last=5)
    save_checkpoint(trainer, root, step=4, consumed_samples=16, keep_last=5)
    shutil.copytree(root / "step_4", root.parent / "pristine")
    control, results = ControlChannel(), {}
    for name, (apply, _) in MANIFEST_DAMAGE.items():
        shutil.rmtree(root / "step_4")
        shutil.copytree(root.parent / "pristine", root / "step_4")
        apply(root / "step_4")
        out = root.parent / f"logs-{name}"
        loader = _Loader()
        try:
            step = resume(trainer, loader, control, EventLog(out, rank=rank)).step
        except Exception as e:  # noqa: BLE001 - reported to the test
            step = repr(e)
        results[name] = (step, getattr(loader, "state", None), read_events(out))
    return results


def test_resume_falls_back_past_a_malformed_manifest_and_says_why(tmp_path):
    results = run_ranks(1, _resume_past_damage, asset_config(tmp_path))[0]
    for name, (step, state, events) in results.items():
        assert step == 2 and state == {"consumed_samples": 8}, (name, step)
        (bad,) = [e for e in events if e["event"] == "bad_checkpoint"]
        assert bad["path"].endswith("step_4") and MANIFEST_DAMAGE[name][1] in bad["error"], (name, bad)


def _corrupt_header(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[8:16] = b"\xff" * 8  # the JSON header starts at byte 8
    file.write_bytes(bytes(data))


def test_corrupt_safetensors_header_names_the_file(tmp_path, hf_dir):
    step = copy_checkpoint(TP2, tmp_path / "run")
    rank1 = step / "rank00001.safetensors"
    _corrupt_header(rank1)
    digest = checkpoint_manifest.sha256(rank1)  # a checksum that matches: the header is what is wrong
    edit(step, lambda m: m["files"].update({rank1.name: digest}))
    with pytest.raises(ValueError, match=r"rank00001.safetensors' is not a readable safetensors file"):
        read_full_state(step)
    shard = sorted(hf_dir.glob("model-*.safetensors"))[1]
    _corrupt_header(shard)
    with pytest.raises(ValueError, match=rf"{shard.name}' is not a readable safetensors file"):
        hf.load_hf_checkpoint(hf_dir)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.pop("hidden_size"), "config.json': lacks the required key 'hidden_size'"),
        (lambda c: c.update(num_hidden_layers="2"), "num_hidden_layers = '2' must be a positive integer"),
        (lambda c: c.update(rope_scaling="yes"), "rope_scaling = 'yes' must be an object"),
        (lambda c: c.update(tie_word_embeddings="no"), "tie_word_embeddings = 'no' must be true or false"),
    ],
    ids=["missing", "int-as-text", "rope-not-object", "bool-as-text"],
)
def test_bad_hf_config_names_the_file_and_the_key(hf_dir, edit, message):
    config = json.loads((hf_dir / hf.CONFIG_NAME).read_text())
    edit(config)
    (hf_dir / hf.CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        hf.load_hf_checkpoint(hf_dir)
    assert str(hf_dir / hf.CONFIG_NAME) in str(e.value) and message in str(e.value)


def test_hf_config_that_is_not_json_names_the_file(hf_dir):
    (hf_dir / hf.CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json' is not valid JSON"):
        hf.load_hf_checkpoint(hf_dir)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"num_tokens": {"train": "12", "val": 3}}, r"num_tokens.train '12' \(str\), expected an integer"),
        ({"num_tokens": {"train": 12, "val": -3}}, r"num_tokens.val -3 \(int\), expected an integer >= 0"),
        ({"dtype": 5}, r"dtype 5, expected 'uint16' or 'uint32'"),
        ({"eos_token_id": "0"}, r"eos_token_id '0' \(str\), expected an integer >= 0"),
        ({"vocab_size": True}, r"vocab_size True \(bool\), expected an integer >= 1"),
    ],
    ids=["count-as-text", "negative-count", "dtype-number", "eos-as-text", "vocab-bool"],
)
def test_meta_json_field_of_the_wrong_type_is_named(tmp_path, change, message):
    np.zeros(12, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.zeros(3, dtype=np.uint16).tofile(tmp_path / "val.bin")
    meta = {"format_version": 1, "dtype": "uint16", "vocab_size": 64, "eos_token_id": 0, "tokenizer": "gpt2",
            "num_tokens": {"train": 12, "val": 3}}  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps(meta | change))
    for reader in (read_meta, lambda p: check_dataset(p, model_vocab_size=64)):
        with pytest.raises(ValueError, match=message):
            reader(tmp_path)


def _disk_full(rank: int, world: int, config, failing_rank: int) -> dict:
    trainer = build_trainer(config)
    real = checkpoint_save.save_file

    def full(tensors, path, *args, **kwargs):
        if rank == failing_rank:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    results = {}
    for asynchronous in (False, True):
        root = Path(config.checkpoint.dir) / ("async" if asynchronous else "sync")
        saver = Checkpointer(root, keep_last=3, asynchronous=asynchronous)
        saver.save(trainer, step=2, consumed_samples=8)
        saver.finish(trainer)
        checkpoint_save.save_file = full
        try:
            saver.save(trainer, step=3, consumed_samples=16)
            saver.finish(trainer)
            error = None
        except Exception as e:  # noqa: BLE001 - reported to the test
            error = (type(e).__name__, getattr(e, "errno", None), str(e))
        finally:
            checkpoint_save.save_file = real
        step = load_checkpoint(trainer, latest_checkpoint(root))["step"]
        results[asynchronous] = (error, sorted(p.name for p in root.iterdir()), step)
    return results


@pytest.mark.parametrize("world,failing_rank", [(1, 0), (2, 1)], ids=["one-rank", "one-of-two-ranks"])
def test_disk_full_mid_save_keeps_the_last_checkpoint_and_says_so(tmp_path, world, failing_rank):
    results = run_ranks(world, _disk_full, asset_config(tmp_path, dp=world), failing_rank, timeout=60)
    for rank_results in results:  # every rank raises the same error: none waits for the others
        for asynchronous, (error, names, step) in rank_results.items():
            assert error is not None, asynchronous
            kind, code, message = error
            assert kind == "OSError" and code == errno.ENOSPC, error
            assert f"checkpoint of step 3 was not saved: rank {failing_rank} could not write" in message
            assert "No space left on device (the disk is full" in message
            assert "The previous checkpoint and `latest`" in message
            assert names == ["latest", "step_2"] and step == 2  # no step_3, no .tmp-step_3
