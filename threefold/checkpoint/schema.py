"""A manifest read from disk, checked key by key before anything it names is opened.

A manifest is untrusted input: a torn write, a hand edit or a hostile file may drop keys, change their
types, name files outside the checkpoint or describe shards that do not fit together. Each of these is a
ValueError naming the checkpoint and the key, so that a caller (resume) can skip the checkpoint and say
why, and nothing outside the checkpoint directory is ever opened or hashed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

from threefold.checkpoint.manifest import READABLE_VERSIONS, Manifest, shape_of
from threefold.config import Config
from threefold.files import inside

_HUGE = 2**62  # no count or size in a checkpoint comes near; bigger ones would overflow int64 and float


class _Problem(ValueError):
    """A key of the manifest that is missing or malformed (the caller adds which checkpoint)."""


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: Any, where: str, *, low: int = 0) -> int:
    if not _is_int(value) or not low <= value < _HUGE:
        raise _Problem(f"{where} is {value!r} ({_kind(value)}), expected an integer >= {low}")
    return cast(int, value)


def _sizes(value: Any, where: str) -> list[int]:
    if not isinstance(value, list):
        raise _Problem(f"{where} is {value!r} ({_kind(value)}), expected a list of sizes")
    return [_int(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _table(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    if key not in manifest:
        raise _Problem(f"lacks the key {key!r}")
    value = manifest[key]
    if not isinstance(value, dict):
        raise _Problem(f"{key!r} is {_kind(value)}, expected an object")
    return value


def _top_level(manifest: Any) -> None:
    """The progress numbers and the tables every reader relies on."""
    if not isinstance(manifest, dict):
        raise _Problem(f"holds {_kind(manifest)}, expected an object")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS or not _is_int(version):
        raise _Problem(f"has format version {version!r}; this threefold reads {READABLE_VERSIONS}")
    for key in ("step", "consumed_samples"):
        if key not in manifest:
            raise _Problem(f"lacks the key {key!r}")
        _int(manifest[key], repr(key))
    if "optimizer_steps" not in manifest:
        raise _Problem("lacks the key 'optimizer_steps'")
    steps = manifest["optimizer_steps"]
    if not (_is_int(steps) and 0 <= steps < _HUGE or isinstance(steps, float) and 0 <= steps < _HUGE):
        raise _Problem(f"'optimizer_steps' is {steps!r} ({_kind(steps)}), expected a number >= 0")
    for key in ("model", "config"):
        _table(manifest, key)
    for key, size in _table(manifest, "layout").items():
        _int(size, f"layout.{key}", low=1)


def _entry(entry: Any, where: str, files: dict[str, Any]) -> None:
    """One saved piece of a tensor: its file is listed, its TP coordinates and ZeRO range make sense."""
    if not isinstance(entry, dict):
        raise _Problem(f"{where} is {_kind(entry)}, expected an object")
    for key in ("file", "shape", "tp_dim", "tp_full_size", "tp_rank", "tp_size"):
        if key not in entry:
            raise _Problem(f"{where} lacks the key {key!r}")
    if not isinstance(entry["file"], str) or entry["file"] not in files:
        raise _Problem(f"{where} names file {entry['file']!r}, which 'files' does not list")
    shape = _sizes(entry["shape"], f"{where}.shape")
    tp_size = _int(entry["tp_size"], f"{where}.tp_size", low=1)
    tp_rank = _int(entry["tp_rank"], f"{where}.tp_rank")
    if tp_rank >= tp_size:
        raise _Problem(f"{where}.tp_rank ({tp_rank}) must be below its tp_size ({tp_size})")
    local = shape
    if "flat" in entry or "local_shape" in entry:
        flat = _sizes(entry.get("flat"), f"{where}.flat")
        local = _sizes(entry.get("local_shape"), f"{where}.local_shape")
        if len(flat) != 2 or not flat[0] <= flat[1] <= math.prod(local) or shape != [flat[1] - flat[0]]:
            raise _Problem(
                f"{where}: flat range {flat} and shape {shape} do not describe a piece of a tensor "
                f"of shape {local}"
            )
    if entry["tp_dim"] is not None:
        dim = _int(entry["tp_dim"], f"{where}.tp_dim")
        if dim >= len(local):
            raise _Problem(f"{where}.tp_dim ({dim}) is not a dimension of its shape {local}")
        _int(entry["tp_full_size"], f"{where}.tp_full_size")
    elif entry["tp_full_size"] is not None:
        _int(entry["tp_full_size"], f"{where}.tp_full_size")


def _tensor(entries: Any, key: str, files: dict[str, Any]) -> None:
    """Every piece of one tensor, and that the pieces agree on how the tensor was split."""
    where = f"tensors[{key!r}]"
    if not isinstance(entries, list) or not entries:
        raise _Problem(f"{where} is {entries!r}, expected a non-empty list of pieces")
    for i, entry in enumerate(entries):
        _entry(entry, f"{where}[{i}]", files)
    split = {(e["tp_dim"], e["tp_full_size"], e["tp_size"], "flat" in e) for e in entries}
    if len(split) > 1:
        raise _Problem(f"{where}: its pieces disagree on tp_dim, tp_full_size, tp_size or ZeRO ranges")
    if "flat" not in entries[0]:
        ranks = [e["tp_rank"] for e in entries]
        if len(set(ranks)) != len(ranks):
            raise _Problem(f"{where} lists a TP rank twice: {sorted(ranks)}")


def check_manifest(path: Path, manifest: Any) -> Manifest:
    """`manifest` (parsed JSON of `path`/manifest.json) once it has every key a reader uses, with the
    right types, and every file it names stays inside `path`; ValueError naming the key otherwise."""
    where = f"checkpoint {str(path)!r}: manifest.json"
    try:
        _top_level(manifest)
        files = _table(manifest, "files")
        for name, digest in files.items():
            if not isinstance(digest, str):
                raise _Problem(f"files[{name!r}] is {_kind(digest)}, expected a SHA-256 string")
        for key, entries in _table(manifest, "tensors").items():
            _tensor(entries, key, files)
    except _Problem as e:
        raise ValueError(f"{where} {e}") from None
    for name in files:
        inside(path, name, what=f"checkpoint {str(path)!r}: file")
    return cast(Manifest, manifest)


def load_manifest(path: Path) -> Manifest:
    """A checkpoint's manifest, once it is well-formed (`check_manifest`) and every file it names exists."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{str(path)!r} is not a checkpoint: no manifest.json")
    try:
        raw = json.loads(manifest_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(manifest_path)!r} is not valid JSON: {e}") from None
    manifest = check_manifest(path, raw)
    for name in manifest["files"]:
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {str(path)!r} lacks {name}")
    return manifest


def read_manifest(path: str | Path, config: Config) -> Manifest:
    """Read and check a checkpoint's manifest against the model being trained; ValueError otherwise."""
    path = Path(path)
    manifest = load_manifest(path)
    want = shape_of(config)
    have = manifest["model"]
    if have != want:
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        raise ValueError(f"checkpoint {str(path)!r} holds another model shape: (checkpoint, config) = {diff}")
    return manifest
