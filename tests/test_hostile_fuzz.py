"""Fuzzed manifests: a real small checkpoint's manifest.json changed at random (keys deleted, values of
other types, names, shapes, TP coordinates and ZeRO ranges nudged), seeded and bounded so it runs in
seconds. Every read either succeeds or raises a ValueError with a message, never another exception, and
never opens a file outside the checkpoint directory."""

import copy
import json
import random
import shutil
from pathlib import Path

import pytest
from distributed import run_ranks
from hostile import RANK0, TP2, ZERO, asset_config, build_trainer, copy_checkpoint, manifest_of, record_opens

from threefold.checkpoint import convert_checkpoint, load_checkpoint, read_full_state


@pytest.fixture
def opened(monkeypatch) -> list[Path]:
    seen: list[Path] = []
    record_opens(seen, monkeypatch.setattr)
    return seen


POOL = [None, True, False, -1, 0, 1, 3, 2**70, 1.5, float("nan"), "", "x", "../x", "/etc/passwd",
        [], {}, [1, 2], [-1], {"a": 1}, RANK0, "rank00001.safetensors"]  # fmt: skip


SHARD_FIELDS = {"file", "shape", "flat", "local_shape", "tp_dim", "tp_full_size", "tp_rank", "tp_size"}


def _mutate(doc: dict, rng: random.Random) -> str:
    """One random change somewhere in the manifest: delete, replace, nudge or rename; says what it did."""
    places: list[tuple] = []

    def walk(node, trail):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, value in items:
            places.append((node, key, trail + [key]))
            walk(value, trail + [key])

    walk(doc, [])
    action = rng.choice(["delete", "replace", "nudge", "rename"])
    if rng.random() < 0.5:  # half the time a small change to a shard's coordinates, which often looks valid
        places = [p for p in places if SHARD_FIELDS & set(map(str, p[2]))]
        action = "nudge"
    node, key, trail = rng.choice(places)
    value = node[key]
    if action == "delete":
        del node[key]
    elif action == "rename" and isinstance(node, dict):
        node[rng.choice([f"{key}x", f"../{key}", ""])] = node.pop(key)
    elif action == "nudge" and isinstance(value, int) and not isinstance(value, bool):
        node[key] = rng.choice([value - 1, value + 1, value * 2, -value])
    elif action == "nudge" and isinstance(value, str):
        node[key] = rng.choice([f"../{value}", f"{value}x", f"/{value}"])
    else:
        action = "replace"
        node[key] = copy.deepcopy(rng.choice(POOL))
    return f"{action} {trail}"


def _fuzz(step: Path, pristine: dict, trials: int, seed: int, load, opened: list[Path]) -> list:
    """Load `trials` mutations of the manifest; the problems: other exceptions, or a file read elsewhere."""
    rng = random.Random(seed)
    problems = []
    for trial in range(trials):
        doc = copy.deepcopy(pristine)
        what = [_mutate(doc, rng) for _ in range(rng.randint(1, 3))]
        (step / "manifest.json").write_text(json.dumps(doc))
        opened.clear()
        try:
            load(step, trial)
        except ValueError as e:
            if not str(e):
                problems.append((trial, what, "a ValueError without a message"))
        except Exception as e:  # noqa: BLE001 - exactly what the fuzz looks for
            problems.append((trial, what, repr(e)))
        outside = [p for p in opened if step.resolve() not in p.resolve().parents]
        if outside:
            problems.append((trial, what, f"read {outside}"))
    return problems


@pytest.mark.parametrize("asset", [TP2, ZERO], ids=["tp2", "dp2-zero"])
def test_fuzzed_manifests_read_or_raise_value_error(tmp_path, opened, asset):
    step = copy_checkpoint(asset, tmp_path / "run")
    shutil.copy(step / RANK0, step.parent / "x")  # what a `../x` would find, if it were followed

    def read_and_convert(step: Path, trial: int) -> None:
        read_full_state(step)
        out = tmp_path / f"out{trial}"
        try:
            convert_checkpoint(step, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    problems = _fuzz(step, manifest_of(step), 150, 13, read_and_convert, opened)
    assert not problems, problems[:5]


def _load_fuzzed(rank: int, world: int, config, step: str, trials: int, seed: int) -> list:
    trainer = build_trainer(config)
    opened: list[Path] = []
    record_opens(opened, setattr)
    path = Path(step)
    return _fuzz(path, manifest_of(path), trials, seed, lambda p, _: load_checkpoint(trainer, p), opened)


@pytest.mark.parametrize("asset", [TP2, ZERO], ids=["tp2", "dp2-zero"])
def test_fuzzed_manifests_load_into_a_model_or_raise_value_error(tmp_path, asset):
    step = copy_checkpoint(asset, tmp_path / "run")
    shutil.copy(step / RANK0, step.parent / "x")
    problems = run_ranks(1, _load_fuzzed, asset_config(tmp_path), str(step), 100, 7)[0]
    assert not problems, problems[:5]
