"""Loading: rebuild each full tensor from the shards of whatever layout saved it, keep this rank's slice."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from threefold.checkpoint.manifest import Manifest, TensorEntry, layout_of, verify_files
from threefold.checkpoint.parts import TrainState, named_parameters, quiesce, set_rng_state
from threefold.checkpoint.schema import read_manifest
from threefold.files import inside
from threefold.optim import OptimizerState, ParamSlice
from threefold.parallel.layers import full_shape_of, shard_of
from threefold.parallel.mesh import Mesh


def open_safetensors(path: Path) -> Any:
    """A safetensors file opened for reading; ValueError naming the file when its header is unreadable."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError for a corrupt header
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({e})") from None


class ShardReader:
    """Reads full tensors of one checkpoint, keeping each file open once.

    The manifest has passed checkpoint.schema; what it says is still checked against the files (each
    piece's shape) and against itself (the pieces join), so a manifest that lies gives a ValueError.
    """

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self._handles: dict[str, tuple[Any, set[str]]] = {}

    def _read(self, entry: TensorEntry, key: str) -> torch.Tensor:
        file = entry["file"]
        if file not in self._handles:
            handle = open_safetensors(inside(self.path, file, what="checkpoint file"))
            self._handles[file] = (handle, set(handle.keys()))
        handle, keys = self._handles[file]
        if key not in keys:
            raise ValueError(f"checkpoint file {str(self.path / file)!r} lacks the tensor {key!r}")
        tensor = handle.get_tensor(key)
        if list(tensor.shape) != entry["shape"]:
            raise ValueError(
                f"checkpoint file {str(self.path / file)!r} holds {key!r} of shape {list(tensor.shape)}, "
                f"but the manifest says {entry['shape']}"
            )
        return tensor

    def _tp_local(self, key: str, entries: list[TensorEntry]) -> torch.Tensor:
        """One TP rank's tensor: a single entry, or ZeRO flat pieces from every data-parallel rank joined."""
        if "flat" not in entries[0]:
            return self._read(entries[0], key)
        pieces = sorted(entries, key=lambda e: e["flat"][0])
        shape = pieces[0]["local_shape"]
        covered = 0
        for e in pieces:
            if e["flat"][0] != covered:
                where = f"checkpoint {str(self.path)!r}: {key!r}"
                raise ValueError(f"{where} lacks elements {covered}..{e['flat'][0]}")
            covered = e["flat"][1]
        if covered != math.prod(shape):
            where = f"checkpoint {str(self.path)!r}: {key!r}"
            raise ValueError(f"{where} ends at {covered} of {math.prod(shape)} elements")
        return torch.cat([self._read(e, key).reshape(-1) for e in pieces]).view(shape)

    def full(self, key: str) -> torch.Tensor:
        """The full (unpadded) tensor `key`, rebuilt from the shards of whatever layout saved it."""
        by_rank: dict[int, list[TensorEntry]] = {}
        for e in self.manifest["tensors"][key]:
            by_rank.setdefault(e["tp_rank"], []).append(e)
        first = by_rank[min(by_rank)][0]
        tp_dim, tp_full_size = first["tp_dim"], first["tp_full_size"]
        if tp_dim is None:
            return self._tp_local(key, by_rank[min(by_rank)])
        if sorted(by_rank) != list(range(first["tp_size"])):
            where = f"checkpoint {str(self.path)!r}: {key!r}"
            raise ValueError(f"{where} has TP shards {sorted(by_rank)} of {first['tp_size']}")
        parts = [self._tp_local(key, by_rank[r]) for r in range(first["tp_size"])]
        assert tp_full_size is not None, f"{key}: checkpoint.schema checks a TP-sharded entry names it"
        try:
            return torch.cat(parts, dim=tp_dim).narrow(tp_dim, 0, tp_full_size)
        except (RuntimeError, IndexError):
            where = f"checkpoint {str(self.path)!r}: {key!r}"
            shapes = [list(t.shape) for t in parts]
            raise ValueError(
                f"{where} has TP shards of shapes {shapes}, which do not join along dim {tp_dim} into "
                f"{tp_full_size} rows"
            ) from None

    def local(self, key: str, param: nn.Parameter, mesh: Mesh) -> torch.Tensor:
        """This TP rank's slice of the full tensor `key`, shaped like `param`."""
        full = self.full(key)
        if tuple(full.shape) != full_shape_of(param):
            raise ValueError(
                f"checkpoint {str(self.path)!r}: {key} has shape {tuple(full.shape)}, "
                f"which does not shard to this model's {tuple(param.shape)}"
            )
        return shard_of(full, param, mesh.tp_rank, mesh.tp_size)


def moment_keys(manifest: Manifest, path: Path) -> dict[str, dict[str, str]]:
    """Parameter name -> {moment name: tensor key}; ValueError if only some parameters have moments."""
    keys: dict[str, dict[str, str]] = {}
    for key in manifest["tensors"]:
        name, _, moment = key.partition("::")
        keys.setdefault(name, {})
        if moment:
            keys[name][moment] = key
    kinds = {tuple(sorted(m)) for m in keys.values()}
    if len(kinds) > 1:
        raise ValueError(
            f"checkpoint {str(path)!r} holds optimizer state {sorted(kinds)} that differs between "
            "parameters: it is incomplete"
        )
    return keys


@torch.no_grad()
def load_checkpoint(state: TrainState, path: str | Path, *, weights_only: bool = False) -> Manifest:
    """Load weights and optimizer state into this rank's part of the model, whatever layout saved them.

    Every check (manifest, model shape, missing tensors, checksums of the files this rank reads, the
    optimizer state's fit) runs before any parameter is written. Returns the manifest (step,
    consumed_samples, ...). `weights_only` (fine-tuning) loads the weights alone: the optimizer starts
    afresh (no moments, step count 0), the RNG is left as it is, and the saved optimizer state is neither
    read nor checked.
    """
    path = Path(path)
    manifest = read_manifest(path, state.config)
    quiesce(state)
    mesh = state.mesh
    params = named_parameters(state)
    missing = [name for name in params if name not in manifest["tensors"]]
    if missing:
        raise ValueError(
            f"checkpoint {str(path)!r} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    owned = list(state.optimizer.state_dict().params)  # the parameters this rank's optimizer updates
    assert set(owned) <= set(params), "the optimizer names its state by the model's parameter names"
    in_checkpoint = {} if weights_only else moment_keys(manifest, path)
    moments = {name: in_checkpoint.get(name, {}) for name in owned}
    own_file = f"rank{mesh.rank:05d}.safetensors"
    same_layout = manifest["layout"] == layout_of(state.config)
    restore_rng = not weights_only and same_layout and own_file in manifest["files"]
    reading = list(params) + [key for m in moments.values() for key in m.values()]
    reads = {e["file"] for key in reading for e in manifest["tensors"][key]}
    verify_files(path, manifest, reads | ({own_file} if restore_rng else set()))

    # Read and check everything first, then write: a bad checkpoint leaves the model untouched.
    reader = ShardReader(path, manifest)
    weights = {name: reader.local(name, p, mesh) for name, p in params.items()}
    slices = {
        name: ParamSlice(
            0,
            params[name].numel(),
            weights[name].reshape(-1),
            {m: reader.local(key, params[name], mesh).reshape(-1) for m, key in moments[name].items()},
        )
        for name in owned
    }
    rng: dict[str, torch.Tensor] = {}
    if restore_rng:
        with open_safetensors(inside(path, own_file)) as f:
            rng = {k: f.get_tensor(k) for k in f.keys() if k.startswith("rng::")}
    try:  # the optimizer checks that the state fits it before it writes anything
        steps = 0.0 if weights_only else float(manifest["optimizer_steps"])
        state.optimizer.load_state_dict(OptimizerState(steps, slices))
    except ValueError as e:
        raise ValueError(f"checkpoint {str(path)!r}: {e}") from None
    for name, param in params.items():
        param.copy_(weights[name])
    set_rng_state(rng)
    return manifest
