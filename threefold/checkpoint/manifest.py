"""The manifest of a checkpoint (format version, layout, model shape, progress, one entry per tensor
shard, a checksum per file), and the checkpoints of a run directory (reading one back: checkpoint.schema)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from threefold.config import Config
from threefold.files import inside

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 added ZeRO shards: entries with a `flat` range
MODEL_KEYS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
              "ffn_hidden_size", "tie_embeddings", "attention_bias")  # fmt: skip


class TensorEntry(TypedDict):
    """One saved piece of a full tensor: which file holds it and which slice of the full tensor it is."""

    file: str
    shape: list[int]
    tp_dim: int | None
    """The dimension split over TP ranks (None: replicated)."""
    tp_full_size: int | None
    """The full, unpadded size along tp_dim."""
    tp_rank: int
    tp_size: int
    flat: NotRequired[list[int]]
    """A ZeRO shard: [start, end) of the flattened TP-local tensor."""
    local_shape: NotRequired[list[int]]
    """The TP-local tensor's shape, for a ZeRO shard."""


class Manifest(TypedDict):
    format_version: int
    step: int
    consumed_samples: int
    """The data position: samples all data-parallel ranks have consumed together."""
    optimizer_steps: float
    layout: dict[str, int]
    model: dict[str, Any]
    config: dict[str, Any]
    files: dict[str, str]
    """File name -> SHA-256."""
    tensors: dict[str, list[TensorEntry]]
    """`<param name>` (fp32 master weights) and `<param name>::<moment>` -> its saved pieces."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def layout_of(config: Config) -> dict[str, int]:
    p = config.parallel
    return {
        "tp_size": p.tp_size,
        "pp_size": p.pp_size,
        "dp_size": p.dp_size,
        "num_model_chunks": p.num_model_chunks,
    }


def shape_of(config: Config) -> dict[str, Any]:
    return {k: getattr(config.model, k) for k in MODEL_KEYS}


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))


def verify_files(path: Path, manifest: Manifest, names: set[str]) -> None:
    """ValueError unless each named file matches the checksum the manifest holds for it."""
    for name in sorted(names):
        if sha256(path / name) != manifest["files"][name]:
            raise ValueError(
                f"checkpoint file {str(path / name)!r} does not match its checksum (corrupt or truncated)"
            )


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints of `root`."""
    steps = sorted(
        (int(d.name.split("_")[1]), d) for d in root.glob("step_*") if d.name.split("_")[1].isdigit()
    )
    for _, old in steps[: max(0, len(steps) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def _pointer(root: Path) -> str | None:
    """The directory name `latest` holds, or None when there is no `latest`."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    return pointer.read_text(errors="replace").strip()


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `latest` points to in `root`, or None when there is none.

    `latest` is read, so untrusted: a name leaving `root` (`../../elsewhere`, an absolute path, a symlink)
    is refused with a ValueError rather than followed.
    """
    root = Path(root)
    name = _pointer(root)
    if name is None:
        return None
    pointer = root / "latest"
    try:
        path = inside(root, name, what="checkpoint")
    except ValueError:
        raise ValueError(
            f"{str(pointer)!r} points to {name!r}, which is not a directory inside {str(root)!r}; "
            "refusing to follow it (write the name of a step_<N> directory into it, or delete it)"
        ) from None
    if not (path / "manifest.json").is_file():
        raise ValueError(f"{str(pointer)!r} points to {str(path)!r}, which holds no manifest.json")
    return path


def checkpoints_newest_first(root: str | Path) -> list[Path]:
    """Every checkpoint directory `step_<N>` of `root`, newest first, damaged ones included.

    `latest` comes first when it names one of them; the others follow by step, so a caller can fall back
    past a checkpoint that turns out to be damaged, and say why it skipped it. (A `step_<N>` directory
    is only ever created complete, by a rename: one without a manifest has been damaged since.) `latest`
    is compared by name only, so a pointer leaving `root` is never followed here.
    """
    root = Path(root)
    found = sorted(
        ((int(d.name[5:]), d) for d in root.glob("step_*") if d.name[5:].isdigit() and d.is_dir()),
        reverse=True,
    )
    paths = [d for _, d in found]
    named = _pointer(root)
    for d in paths:
        if d.name == named:
            paths.remove(d)
            paths.insert(0, d)
            break
    return paths
