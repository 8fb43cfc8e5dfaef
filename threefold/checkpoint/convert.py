"""Checkpoints of full tensors in one file: from imported weights, or consolidated from any layout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from threefold.checkpoint.load import ShardReader
from threefold.checkpoint.manifest import (
    FORMAT_VERSION,
    Manifest,
    TensorEntry,
    sha256,
    shape_of,
    verify_files,
    write_manifest,
)
from threefold.checkpoint.schema import load_manifest
from threefold.config import Config
from threefold.files import check_output_dir, staged_dir


def write_full_checkpoint(
    config: Config,
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    keep: Sequence[str | Path] = (),
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """A step-0 checkpoint from full (unsharded) tensors, e.g. an imported Hugging Face model.

    One file, no optimizer state; it loads under any layout like any other checkpoint. `extra_files`
    (name -> text, e.g. the model.toml of an import) are written into the directory with it.
    `out_dir` follows `_write_single_file`'s rules.
    """
    progress = {"step": 0, "consumed_samples": 0, "optimizer_steps": 0.0}
    return _write_single_file(
        shape_of(config), config.to_dict(), progress, state, out_dir,
        overwrite=overwrite, keep=keep, extra_files=extra_files or {},
    )  # fmt: skip


def _write_single_file(
    model_shape: dict[str, Any],
    config_dict: dict[str, Any],
    progress: dict[str, Any],
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    *,
    overwrite: bool,
    keep: Sequence[str | Path],
    extra_files: Mapping[str, str],
) -> Path:
    """Full tensors in one file under layout (1, 1, 1).

    `out_dir` must be absent or empty unless `overwrite`, and never holds one of the `keep` paths (the
    input). The checkpoint is written to a temporary sibling, fsynced and renamed into place, so it
    appears complete or not at all.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite=overwrite, keep=list(keep))
    file_name = "rank00000.safetensors"
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}

    def entry(tensor: torch.Tensor) -> TensorEntry:
        return TensorEntry(file=file_name, tp_dim=None, tp_full_size=None, tp_rank=0, tp_size=1,
                           shape=list(tensor.shape))  # fmt: skip

    with staged_dir(out) as tmp:
        save_file(tensors, str(tmp / file_name))
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            step=progress["step"],
            consumed_samples=progress["consumed_samples"],
            optimizer_steps=progress["optimizer_steps"],
            layout={"tp_size": 1, "pp_size": 1, "dp_size": 1, "num_model_chunks": 1},
            model=model_shape,
            config=config_dict,
            files={file_name: sha256(tmp / file_name)},
            tensors={k: [entry(v)] for k, v in tensors.items()},
        )
        write_manifest(tmp, manifest)
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
    return out


def convert_checkpoint(
    src: str | Path, dst: str | Path, *, overwrite: bool = False, keep: Sequence[str | Path] = ()
) -> Path:
    """Consolidate a checkpoint saved under any layout (ZeRO shards included) into one file of full
    tensors: fp32 weights and Adam moments by parameter name, with the step, data position and config.

    Loading needs no conversion (every layout reads every other), so this is for archiving, inspection
    or moving a run to other tools. Every source file is checked against its checksum first. `dst` must
    be absent or empty unless `overwrite`, and may never hold `src` or another of the `keep` paths.
    """
    path = Path(src)
    keep = [path, *keep]
    check_output_dir(dst, overwrite=overwrite, keep=keep)  # before the reading, which may take long
    manifest = load_manifest(path)
    verify_files(path, manifest, set(manifest["files"]))
    reader = ShardReader(path, manifest)
    state = {k: reader.full(k) for k in manifest["tensors"]}
    progress = {"step": manifest["step"], "consumed_samples": manifest["consumed_samples"],
                "optimizer_steps": manifest["optimizer_steps"]}  # fmt: skip
    return _write_single_file(
        manifest["model"], manifest["config"], progress, state, dst, overwrite=overwrite, keep=keep,
        extra_files={},
    )  # fmt: skip


def read_full_state(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model config as saved, full fp32 weights by name) of any checkpoint, e.g. for export."""
    path = Path(path)
    manifest = load_manifest(path)
    keys = [k for k in manifest["tensors"] if "::" not in k]
    model = manifest["config"].get("model")
    if not isinstance(model, dict):
        raise ValueError(f"checkpoint {str(path)!r}: manifest.json's config has no model section")
    verify_files(path, manifest, {e["file"] for k in keys for e in manifest["tensors"][k]})
    reader = ShardReader(path, manifest)
    return model, {k: reader.full(k) for k in keys}
