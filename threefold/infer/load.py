"""A checkpoint of any training layout as this rank's inference model, plus its config and tokenizer.

A checkpoint's manifest holds the config it was trained with; its model section is the model. Each
full tensor is rebuilt from whatever layout saved it (checkpoint.load.ShardReader) and this rank keeps
its own TP slice of the layers its pipeline stage holds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from threefold.checkpoint import latest_checkpoint, load_manifest
from threefold.checkpoint.load import ShardReader
from threefold.checkpoint.manifest import verify_files
from threefold.config import ModelConfig
from threefold.model.transformer import Transformer, build_model
from threefold.parallel.layers import TPContext, full_shape_of, shard_of
from threefold.parallel.mesh import Mesh
from threefold.pipeline.partition import chunk_layer_ranges

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
"""What travels with a checkpoint from `import-hf` to `export-hf`: the tokenizer, its settings (the chat
template among them, or beside them in newer exports) and the special tokens."""


def checkpoint_dir(arg: str | Path) -> Path:
    """A checkpoint directory as given, or the one `latest` names in a run's checkpoint.dir; ValueError
    when it is neither."""
    path = Path(arg)
    if (path / "manifest.json").is_file():
        return path
    if (path / "latest").is_file():
        found = latest_checkpoint(path)
        if found is not None:
            return found
    if not path.exists():
        raise ValueError(f"checkpoint directory {str(path)!r} does not exist")
    raise ValueError(f"{str(path)!r} is not a checkpoint: no manifest.json, and no 'latest' naming one")


def read_model_config(path: Path) -> ModelConfig:
    """The model section of the config a checkpoint was saved with."""
    fields = load_manifest(path)["config"].get("model")
    if not isinstance(fields, dict):
        raise ValueError(f"checkpoint {str(path)!r}: manifest.json's config has no model section")
    try:
        model = ModelConfig(**fields)
        model.check()
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r}: its config's model section is not usable: {e}") from None
    return model


def build_stage(
    cfg: ModelConfig, mesh: Mesh, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """This rank's pipeline stage of the model for inference (no sequence parallelism, no recomputation),
    with placeholder weights."""
    first, last = chunk_layer_ranges(cfg.num_layers, mesh.pp_size, 1)[mesh.pp_rank]
    tp = TPContext(mesh.tp_group, overlap_comm=False)
    return build_model(
        cfg, tp, device=device, dtype=dtype, first_layer=first, last_layer=last,
        has_embedding=mesh.is_first_stage, has_head=mesh.is_last_stage,
    )  # fmt: skip


@torch.no_grad()
def load_weights(model: Transformer, full: Callable[[str], torch.Tensor]) -> None:
    """Copy this rank's slice of every full tensor `full(name)` into the model; ValueError on a shape
    that does not fit, before anything is written."""
    tp = model.tp
    local = {}
    for name, param in model.named_parameters():
        tensor = full(name)
        if tuple(tensor.shape) != full_shape_of(param):
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, but the model expects {full_shape_of(param)}"
            )
        local[name] = shard_of(tensor, param, tp.rank, tp.size)
    for name, param in model.named_parameters():
        param.copy_(local[name])


def load_checkpoint_weights(model: Transformer, path: Path) -> None:
    """Load a checkpoint of any layout into this rank's inference model (files checked against their
    SHA-256 first)."""
    manifest = load_manifest(path)
    names = [name for name, _ in model.named_parameters()]
    missing = [n for n in names if n not in manifest["tensors"]]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks tensors {missing[:5]}")
    verify_files(path, manifest, {e["file"] for n in names for e in manifest["tensors"][n]})
    load_weights(model, ShardReader(path, manifest).full)
