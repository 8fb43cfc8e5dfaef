"""Saving: each rank snapshots what it owns, writes one file (possibly on a thread), and rank 0 commits."""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from threefold.checkpoint.manifest import (
    FORMAT_VERSION,
    Manifest,
    TensorEntry,
    layout_of,
    prune,
    sha256,
    shape_of,
    write_manifest,
)
from threefold.checkpoint.parts import TrainState, named_parameters, quiesce, rng_state
from threefold.parallel.layers import is_sharded
from threefold.parallel.mesh import Mesh


def _saves(param: nn.Parameter, mesh: Mesh, dp_sharded: bool) -> bool:
    """Whether this rank writes its range of the parameter: each element exactly once across the world.

    Without ZeRO data-parallel rank 0 holds everything; with ZeRO each data-parallel rank its own part.
    """
    if (mesh.dp_rank != 0 and not dp_sharded) or getattr(param, "tied_copy", False):
        return False
    return is_sharded(param) or mesh.tp_rank == 0


def _entry(
    file: str, tensor: torch.Tensor, param: nn.Parameter, mesh: Mesh, flat: tuple[int, int] | None
) -> TensorEntry:
    """The manifest entry of a saved tensor: the whole TP-local one, or (ZeRO) its flat range `flat`."""
    entry = TensorEntry(
        file=file,
        shape=list(tensor.shape),
        tp_dim=getattr(param, "tp_dim", None),
        tp_full_size=getattr(param, "tp_full_size", None),
        tp_rank=mesh.tp_rank,
        tp_size=mesh.tp_size,
    )
    if flat is not None:
        entry["flat"], entry["local_shape"] = list(flat), list(param.shape)
    return entry


@dataclass
class _Job:
    """One rank's part of one checkpoint, from the snapshot to the commit."""

    step: int
    consumed_samples: int
    optimizer_steps: float
    file: str
    tmp: Path
    entries: dict[str, list[TensorEntry]] = field(default_factory=dict)
    sha256: str = ""
    error: BaseException | None = None


def _snapshot(state: TrainState, job: _Job) -> dict[str, torch.Tensor]:
    """Host copies of what this rank saves; fills in the job's manifest entries and step count."""
    quiesce(state)
    mesh = state.mesh
    params = named_parameters(state)
    optimizer = state.optimizer.state_dict()
    job.optimizer_steps = optimizer.step
    tensors: dict[str, torch.Tensor] = {}
    for name, piece in optimizer.params.items():
        param = params[name]
        if not _saves(param, mesh, optimizer.dp_sharded):
            continue
        whole = piece.start == 0 and piece.end == param.numel()
        flat = None if whole else (piece.start, piece.end)
        for key, tensor in [(name, piece.master), *((f"{name}::{k}", m) for k, m in piece.moments.items())]:
            # A copy even on the CPU: an asynchronous write must not see the next steps' updates.
            host = tensor.detach().to("cpu", torch.float32, copy=True)
            tensors[key] = host.view(param.shape) if whole else host
            job.entries[key] = [_entry(job.file, tensors[key], param, mesh, flat)]
    return tensors | rng_state(on_cuda=any(p.is_cuda for p in params.values()))


def _write(tensors: dict[str, torch.Tensor], path: Path) -> str:
    save_file(tensors, str(path))
    return sha256(path)


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
        self._pending: tuple[threading.Thread, _Job] | None = None

    def save(self, state: TrainState, *, step: int, consumed_samples: int) -> Path:
        """Start (or, synchronously, complete) this step's checkpoint; collective on every rank."""
        self.finish(state)
        mesh = state.mesh
        tmp = self.root / f".tmp-step_{step}"
        if mesh.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # the remains of an earlier crash
            tmp.mkdir(parents=True)
        dist.barrier()
        file = f"rank{mesh.rank:05d}.safetensors"
        # Everything the manifest says is taken now, not at the (possibly later) commit.
        job = _Job(step, consumed_samples, 0.0, file, tmp)
        tensors = _snapshot(state, job)
        if not self.asynchronous:
            job.sha256 = _write(tensors, tmp / file)
            return self._commit(state, job)

        def write() -> None:
            try:
                job.sha256 = _write(tensors, tmp / file)
            except BaseException as e:  # surfaced at the commit
                job.error = e

        thread = threading.Thread(target=write, name=f"checkpoint-step-{step}", daemon=True)
        thread.start()
        self._pending = (thread, job)
        return self.root / f"step_{step}"

    def finish(self, state: TrainState) -> None:
        """Commit the save still in flight, if any (collective)."""
        if self._pending is None:
            return
        thread, job = self._pending
        self._pending = None
        thread.join()
        self._commit(state, job)

    def _commit(self, state: TrainState, job: _Job) -> Path:
        mesh, config = state.mesh, state.config
        ok = job.error is None
        gathered: list[Any] = [None] * mesh.world_size
        dist.all_gather_object(gathered, (ok, job.entries, {job.file: job.sha256} if ok else {}))
        if not all(g[0] for g in gathered):
            if job.error is not None:
                raise job.error
            failed = [r for r, g in enumerate(gathered) if not g[0]]
            raise RuntimeError(f"checkpoint of step {job.step} failed on ranks {failed}; the last one stays")
        final = self.root / f"step_{job.step}"
        if mesh.rank == 0:
            tensors: dict[str, list[TensorEntry]] = {}
            for _, rank_entries, _ in gathered:
                for key, shards in rank_entries.items():
                    tensors.setdefault(key, []).extend(shards)
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                step=job.step,
                consumed_samples=job.consumed_samples,
                optimizer_steps=job.optimizer_steps,
                layout=layout_of(config),
                model=shape_of(config),
                config=config.to_dict(),
                files={k: v for _, _, f in gathered for k, v in f.items()},
                tensors=tensors,
            )
            write_manifest(job.tmp, manifest)
            if final.exists():
                shutil.rmtree(final)
            os.replace(job.tmp, final)
            pointer = self.root / ".latest.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.root / "latest")
            prune(self.root, self.keep_last)
        dist.barrier()
        return final


def save_checkpoint(
    state: TrainState, root: str | Path, *, step: int, consumed_samples: int, keep_last: int
) -> Path:
    """Write this step's checkpoint synchronously (collective: every rank calls it); returns its directory."""
    return Checkpointer(root, keep_last=keep_last).save(state, step=step, consumed_samples=consumed_samples)
