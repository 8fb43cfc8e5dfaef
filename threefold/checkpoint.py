"""Sharded training checkpoints that resume exactly and load under any other layout.

A checkpoint is a directory `step_<N>/` holding

    rank<R>.safetensors   what rank R owns: fp32 master weights and Adam moments, keyed
                          `<param name>`, `<param name>::exp_avg`, `<param name>::exp_avg_sq`
    manifest.json         format version, layout, model shape, step, data position, config, and for
                          every saved tensor: its file, TP shard coordinates and full (unpadded) size;
                          a SHA-256 per file

Each tensor is saved once: data-parallel rank 0 only, a replicated parameter by TP rank 0 only, a tied
embedding by the first pipeline stage only. Since every entry says which slice of which full tensor it
holds, a loader under any (tp, pp, dp, v) rebuilds the full tensor by name and keeps its own slice:
resharding needs no conversion step.

Saving writes into `.tmp-step_<N>/` and renames it only after every rank has written and the manifest
is complete; `latest` (a one-line file) moves last. A crash mid-save leaves the previous checkpoint and
`latest` untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from threefold.config import Config
from threefold.parallel.layers import is_sharded, shard_of

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 added ZeRO shards: entries with a `flat` range
MOMENTS = ("exp_avg", "exp_avg_sq")
RNG_CPU, RNG_CUDA = "rng::cpu", "rng::cuda"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _named_params(trainer: Any) -> dict[int, tuple[str, torch.nn.Parameter]]:
    return {id(p): (name, p) for chunk in trainer.chunks.values() for name, p in chunk.named_parameters()}


def _owned(trainer: Any) -> list[tuple[str, torch.nn.Parameter, int, int, int]]:
    """(name, parameter, optimizer range index, start, end) for every range this rank's optimizer updates."""
    names = _named_params(trainer)
    return [(names[id(p)][0], p, i, a, b) for i, (p, a, b) in enumerate(trainer.optimizer.ranges)]


def _layout_of(config: Config) -> dict[str, int]:
    p = config.parallel
    return {
        "tp_size": p.tp_size,
        "pp_size": p.pp_size,
        "dp_size": p.dp_size,
        "num_model_chunks": p.num_model_chunks,
    }


def _saves(param: torch.Tensor, mesh: Any, zero: bool) -> bool:
    """Whether this rank writes its range of the parameter: each element exactly once across the world.

    Without ZeRO data-parallel rank 0 holds everything; with ZeRO each data-parallel rank its own part.
    """
    if (mesh.dp_rank != 0 and not zero) or getattr(param, "tied_copy", False):
        return False
    return is_sharded(param) or mesh.tp_rank == 0


def _shape_of(config: Config) -> dict[str, Any]:
    m = config.model
    return {k: getattr(m, k) for k in ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads",
                                       "num_kv_heads", "ffn_hidden_size", "tie_embeddings",
                                       "attention_bias")}  # fmt: skip


def _snapshot(
    trainer: Any, file_name: str
) -> tuple[dict[str, torch.Tensor], dict[str, list[dict[str, Any]]]]:
    """Host copies of what this rank saves, and their manifest entries."""
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.wait_params()  # ZeRO: no parameter all-gather may still be writing
    mesh = trainer.mesh
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, list[dict[str, Any]]] = {}
    optimizer = trainer.optimizer
    for name, param, index, start, end in _owned(trainer):
        if not _saves(param, mesh, optimizer.zero):
            continue
        whole = start == 0 and end == param.numel()
        adam_state = optimizer.state_of(index)
        master = optimizer.masters[index]
        for suffix, tensor in [("", master), *((f"::{k}", adam_state.get(k)) for k in MOMENTS)]:
            if tensor is None:
                continue  # no optimizer step yet
            key = name + suffix
            # A copy even on the CPU: an asynchronous write must not see the next steps' updates.
            host = tensor.detach().to("cpu", torch.float32, copy=True)
            tensors[key] = host.view(param.shape) if whole else host
            entry = {
                "file": file_name,
                "shape": list(tensors[key].shape),
                "tp_dim": getattr(param, "tp_dim", None),
                "tp_full_size": getattr(param, "tp_full_size", None),
                "tp_rank": mesh.tp_rank,
                "tp_size": mesh.tp_size,
            }
            if not whole:  # a ZeRO shard: this flat range of the TP-local tensor
                entry.update(flat=[start, end], local_shape=list(param.shape))
            entries[key] = [entry]
    # This rank's random-number state (restored when the layout is unchanged; nothing in training draws
    # random numbers today, but data augmentation or dropout would).
    tensors[RNG_CPU] = torch.get_rng_state()
    if torch.cuda.is_available() and any(t.is_cuda for t in optimizer.params):
        tensors[RNG_CUDA] = torch.cuda.get_rng_state()
    return tensors, entries


def _write(tensors: dict[str, torch.Tensor], path: Path) -> str:
    save_file(tensors, str(path))
    return _sha256(path)


class Checkpointer:
    """Saves checkpoints of one run, synchronously or in the background.

    Asynchronous saving copies this rank's state to host memory (the only part the training step waits
    for) and writes the file on a thread; the commit (manifest, rename, `latest`) is collective, so it
    runs at the next save or at `finish()`, once every rank's file is on disk.
    """

    def __init__(self, root: str | Path, *, keep_last: int, asynchronous: bool = False) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.asynchronous = asynchronous
        self._pending: tuple[threading.Thread, dict[str, Any], Any] | None = None

    def save(self, trainer: Any, *, step: int, consumed_samples: int) -> Path:
        """Start (or, synchronously, complete) this step's checkpoint; collective on every rank."""
        self.finish(trainer)
        mesh = trainer.mesh
        tmp = self.root / f".tmp-step_{step}"
        if mesh.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # the remains of an earlier crash
            tmp.mkdir(parents=True)
        dist.barrier()
        file_name = f"rank{mesh.rank:05d}.safetensors"
        tensors, entries = _snapshot(trainer, file_name)
        # Everything the manifest says is taken now, not at the (possibly later) commit.
        adam_steps = [s["step"] for s in trainer.optimizer.adam.state.values() if "step" in s]
        job: dict[str, Any] = {"step": step, "consumed_samples": consumed_samples, "entries": entries,
                               "file": file_name, "tmp": tmp,
                               "optimizer_steps": float(adam_steps[0]) if adam_steps else 0.0}  # fmt: skip
        if not self.asynchronous:
            job["sha256"] = _write(tensors, tmp / file_name)
            return self._commit(trainer, job)

        def write() -> None:
            try:
                job["sha256"] = _write(tensors, tmp / file_name)
            except BaseException as e:  # surfaced at the commit
                job["error"] = e

        thread = threading.Thread(target=write, name=f"checkpoint-step-{step}", daemon=True)
        thread.start()
        self._pending = (thread, job, None)
        return self.root / f"step_{step}"

    def finish(self, trainer: Any) -> None:
        """Commit the save still in flight, if any (collective)."""
        if self._pending is None:
            return
        thread, job, _ = self._pending
        self._pending = None
        thread.join()
        self._commit(trainer, job)

    def _commit(self, trainer: Any, job: dict[str, Any]) -> Path:
        mesh, config = trainer.mesh, trainer.config
        ok = "error" not in job
        gathered: list[Any] = [None] * mesh.world_size
        files = {job["file"]: job["sha256"]} if ok else {}
        dist.all_gather_object(gathered, (ok, job["entries"], files))
        if not all(g[0] for g in gathered):
            failed = [r for r, g in enumerate(gathered) if not g[0]]
            if "error" in job:
                raise job["error"]
            raise RuntimeError(
                f"checkpoint of step {job['step']} failed on ranks {failed}; the last one stays"
            )
        final = self.root / f"step_{job['step']}"
        if mesh.rank == 0:
            all_entries: dict[str, list[dict[str, Any]]] = {}
            for _, rank_entries, _ in gathered:
                for key, shards in rank_entries.items():
                    all_entries.setdefault(key, []).extend(shards)
            manifest = {
                "format_version": FORMAT_VERSION,
                "step": job["step"],
                "consumed_samples": job["consumed_samples"],
                "optimizer_steps": job["optimizer_steps"],
                "layout": _layout_of(config),
                "model": _shape_of(config),
                "config": config.to_dict(),
                "files": {k: v for _, _, f in gathered for k, v in f.items()},
                "tensors": all_entries,
            }
            tmp = job["tmp"]
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = self.root / ".latest.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.root / "latest")
            _prune(self.root, self.keep_last)
        dist.barrier()
        return final


def save_checkpoint(
    trainer: Any, root: str | Path, *, step: int, consumed_samples: int, keep_last: int
) -> Path:
    """Write this step's checkpoint synchronously (collective: every rank calls it); returns its directory."""
    return Checkpointer(root, keep_last=keep_last).save(trainer, step=step, consumed_samples=consumed_samples)


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(
        (int(d.name.split("_")[1]), d) for d in root.glob("step_*") if d.name.split("_")[1].isdigit()
    )
    for _, old in steps[: max(0, len(steps) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `latest` points to in `root`, or None when there is none."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "manifest.json").is_file():
        raise ValueError(f"{str(pointer)!r} points to {str(path)!r}, which holds no manifest.json")
    return path


def checkpoints_newest_first(root: str | Path) -> list[Path]:
    """Every committed checkpoint in `root` (a `step_<N>` directory with a manifest), newest first.

    `latest` comes first when it points to one of them; the others follow by step, so a caller can
    fall back past a checkpoint that turns out to be damaged.
    """
    root = Path(root)
    found = sorted(
        ((int(d.name[5:]), d) for d in root.glob("step_*") if d.name[5:].isdigit()),
        reverse=True,
    )
    paths = [d for _, d in found if (d / "manifest.json").is_file()]
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in paths:
            paths.remove(named)
            paths.insert(0, named)
    return paths


def read_manifest(path: str | Path, config: Config) -> dict[str, Any]:
    """Read and check a checkpoint's manifest against the model being trained; ValueError otherwise."""
    path = Path(path)
    manifest = _load_manifest(path)
    want = _shape_of(config)
    have = manifest.get("model", {})
    if have != want:
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        raise ValueError(f"checkpoint {str(path)!r} holds another model shape: (checkpoint, config) = {diff}")
    return manifest


def _load_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{str(path)!r} is not a checkpoint: no manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(manifest_path)!r} is not valid JSON: {e}") from None
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{str(manifest_path)!r} has format version {version!r}; this threefold reads {READABLE_VERSIONS}"
        )
    for name in manifest["files"]:
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {str(path)!r} lacks {name}")
    return manifest


def _read(path: Path, file: str, key: str, handles: dict[str, Any]) -> torch.Tensor:
    if file not in handles:
        handles[file] = safe_open(str(path / file), framework="pt")
    return handles[file].get_tensor(key)


def _tp_local(path: Path, key: str, entries: list[dict[str, Any]], handles: dict[str, Any]) -> torch.Tensor:
    """One TP rank's tensor: a single entry, or ZeRO flat pieces from every data-parallel rank joined."""
    if "flat" not in entries[0]:
        return _read(path, entries[0]["file"], key, handles)
    pieces = sorted(entries, key=lambda e: e["flat"][0])
    shape = pieces[0]["local_shape"]
    covered = 0
    for e in pieces:
        if e["flat"][0] != covered:
            raise ValueError(f"checkpoint {str(path)!r}: {key!r} lacks elements {covered}..{e['flat'][0]}")
        covered = e["flat"][1]
    if covered != math.prod(shape):
        total = math.prod(shape)
        raise ValueError(f"checkpoint {str(path)!r}: {key!r} ends at {covered} of {total} elements")
    return torch.cat([_read(path, e["file"], key, handles).reshape(-1) for e in pieces]).view(shape)


def _full_tensor(path: Path, manifest: dict[str, Any], key: str, handles: dict[str, Any]) -> torch.Tensor:
    """The full (unpadded) tensor `key`, rebuilt from the shards of whatever layout saved it."""
    by_rank: dict[int, list[dict[str, Any]]] = {}
    for e in manifest["tensors"][key]:
        by_rank.setdefault(e["tp_rank"], []).append(e)
    first = by_rank[min(by_rank)][0]
    if first["tp_dim"] is None:
        return _tp_local(path, key, by_rank[min(by_rank)], handles)
    if sorted(by_rank) != list(range(first["tp_size"])):
        raise ValueError(
            f"checkpoint {str(path)!r}: {key!r} has TP shards {sorted(by_rank)} of {first['tp_size']}"
        )
    parts = [_tp_local(path, key, by_rank[r], handles) for r in range(first["tp_size"])]
    full = torch.cat(parts, dim=first["tp_dim"])
    return full.narrow(first["tp_dim"], 0, first["tp_full_size"])


@torch.no_grad()
def load_checkpoint(trainer: Any, path: str | Path) -> dict[str, Any]:
    """Load weights and optimizer state into this rank's part of the model, whatever layout saved them.

    Every check (manifest, model shape, missing tensors, checksums of the files this rank reads) runs
    before any parameter is written. Returns the manifest (step, consumed_samples, ...).
    """
    path = Path(path)
    manifest = read_manifest(path, trainer.config)
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.wait_params()  # ZeRO: no parameter all-gather may still be writing
    named = list(_named_params(trainer).values())
    owned = _owned(trainer)
    missing = [name for name, _ in named if name not in manifest["tensors"]]
    if missing:
        raise ValueError(
            f"checkpoint {str(path)!r} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    moments = [
        (name + f"::{k}", index, start, end, param)
        for name, param, index, start, end in owned
        for k in MOMENTS
        if name + f"::{k}" in manifest["tensors"]
    ]
    own_file = f"rank{trainer.mesh.rank:05d}.safetensors"
    restore_rng = manifest["layout"] == _layout_of(trainer.config) and own_file in manifest["files"]
    keys = [name for name, _ in named] + [key for key, *_ in moments]
    reads = {e["file"] for key in keys for e in manifest["tensors"][key]}
    _verify_files(path, manifest, reads | ({own_file} if restore_rng else set()))

    mesh = trainer.mesh
    handles: dict[str, Any] = {}

    def local_of(key: str, param: torch.Tensor) -> torch.Tensor:
        full = _full_tensor(path, manifest, key, handles)
        local = shard_of(full, param, mesh.tp_rank, mesh.tp_size)
        if tuple(local.shape) != tuple(param.shape):
            raise ValueError(
                f"checkpoint {str(path)!r}: {key} has shape {tuple(full.shape)}, "
                f"which does not shard to this model's {tuple(param.shape)}"
            )
        return local

    # Read and check everything first, then write: a bad checkpoint leaves the model untouched.
    weights = [(param, local_of(name, param)) for name, param in named]
    loaded_moments = [(key, index, local_of(key, p).reshape(-1)[a:b]) for key, index, a, b, p in moments]
    optimizer = trainer.optimizer
    local_weights = {id(p): w for p, w in weights}
    for param, local in weights:
        param.copy_(local)
    for (param, start, end), master in zip(optimizer.ranges, optimizer.masters, strict=True):
        master.copy_(local_weights[id(param)].reshape(-1)[start:end])
    adam = optimizer.adam
    index_in_adam = {id(p): i for i, p in enumerate(p for g in adam.param_groups for p in g["params"])}
    adam_state: dict[int, dict[str, Any]] = {}
    for key, index, piece in loaded_moments:
        state = adam_state.setdefault(
            index_in_adam[id(optimizer.masters[index])], {"step": torch.tensor(manifest["optimizer_steps"])}
        )
        state[key.split("::")[1]] = piece.to(optimizer.masters[index].device)
    if restore_rng:
        with safe_open(str(path / own_file), framework="pt") as f:
            if RNG_CPU in f.keys():
                torch.set_rng_state(f.get_tensor(RNG_CPU))
            if RNG_CUDA in f.keys() and torch.cuda.is_available():
                torch.cuda.set_rng_state(f.get_tensor(RNG_CUDA))
    if adam_state:
        state_dict = adam.state_dict()
        state_dict["state"] = adam_state
        adam.load_state_dict(state_dict)
    return manifest


def _verify_files(path: Path, manifest: dict[str, Any], names: set[str]) -> None:
    for name in sorted(names):
        if _sha256(path / name) != manifest["files"][name]:
            raise ValueError(
                f"checkpoint file {str(path / name)!r} does not match its checksum (corrupt or truncated)"
            )


def write_full_checkpoint(config: Config, state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """A step-0 checkpoint from full (unsharded) tensors, e.g. an imported Hugging Face model.

    One file, no optimizer state; it loads under any layout like any other checkpoint.
    """
    progress = {"step": 0, "consumed_samples": 0, "optimizer_steps": 0.0}
    return _write_single_file(_shape_of(config), config.to_dict(), progress, state, out_dir)


def _write_single_file(
    model_shape: dict[str, Any],
    config_dict: dict[str, Any],
    progress: dict[str, Any],
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
) -> Path:
    """Full tensors in one file under layout (1, 1, 1), written to a temporary directory and renamed."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise ValueError(f"{str(out)!r} exists and is not a checkpoint; refusing to overwrite it")
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    file_name = "rank00000.safetensors"
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(tmp / file_name))
    entry = {"file": file_name, "tp_dim": None, "tp_full_size": None, "tp_rank": 0, "tp_size": 1}
    manifest = {
        "format_version": FORMAT_VERSION,
        **progress,
        "layout": {"tp_size": 1, "pp_size": 1, "dp_size": 1, "num_model_chunks": 1},
        "model": model_shape,
        "config": config_dict,
        "files": {file_name: _sha256(tmp / file_name)},
        "tensors": {k: [{**entry, "shape": list(v.shape)}] for k, v in tensors.items()},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def convert_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Consolidate a checkpoint saved under any layout (ZeRO shards included) into one file of full
    tensors: fp32 weights and Adam moments by parameter name, with the step, data position and config.

    Loading needs no conversion (every layout reads every other), so this is for archiving, inspection
    or moving a run to other tools. Every source file is checked against its checksum first.
    """
    path = Path(src)
    manifest = _load_manifest(path)
    _verify_files(path, manifest, set(manifest["files"]))
    handles: dict[str, Any] = {}
    state = {k: _full_tensor(path, manifest, k, handles) for k in manifest["tensors"]}
    progress = {k: manifest[k] for k in ("step", "consumed_samples", "optimizer_steps")}
    return _write_single_file(manifest["model"], manifest["config"], progress, state, dst)


def read_full_state(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model config as saved, full fp32 weights by name) of any checkpoint, e.g. for export."""
    path = Path(path)
    manifest = _load_manifest(path)
    keys = [k for k in manifest["tensors"] if "::" not in k]
    _verify_files(path, manifest, {e["file"] for k in keys for e in manifest["tensors"][k]})
    handles: dict[str, Any] = {}
    return manifest["config"]["model"], {k: _full_tensor(path, manifest, k, handles) for k in keys}
