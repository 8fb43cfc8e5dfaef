"""Saving: each rank snapshots what it owns, writes one file (possibly on a thread), and rank 0 commits."""

from __future__ import annotations

import errno
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

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
from threefold.files import fsync_file, publish_dir, write_atomic
from threefold.parallel.layers import is_tp_primary, num_tp_shards, tp_shard_index
from threefold.parallel.mesh import Mesh


def _saves(param: nn.Parameter, mesh: Mesh, dp_sharded: bool) -> bool:
    """Whether this rank writes its range of the parameter: each element exactly once across the world.

    Without ZeRO data-parallel (and context-parallel) rank 0 holds everything; with ZeRO each rank of
    the dp x cp group its own part.
    Of a TP shard held by several ranks (replicated kv heads) only the first saves.
    """
    replica = mesh.dp_rank != 0 or mesh.cp_rank != 0
    if (replica and not dp_sharded) or getattr(param, "tied_copy", False):
        return False
    return is_tp_primary(param, mesh.tp_rank)


def _entry(
    file: str, tensor: torch.Tensor, param: nn.Parameter, mesh: Mesh, flat: tuple[int, int] | None
) -> TensorEntry:
    """The manifest entry of a saved tensor: the whole TP-local one, or (ZeRO) its flat range `flat`.

    tp_rank and tp_size count distinct shards: a kv projection replicated over pairs of ranks at
    tp_size 4 is saved as shards 0 and 1 of 2, the split a loader joins whatever its own layout.
    """
    entry = TensorEntry(
        file=file,
        shape=list(tensor.shape),
        tp_dim=getattr(param, "tp_dim", None),
        tp_full_size=getattr(param, "tp_full_size", None),
        tp_rank=tp_shard_index(param, mesh.tp_rank),
        tp_size=num_tp_shards(param, mesh.tp_size),
    )
    if flat is not None:
        entry["flat"], entry["local_shape"] = list(flat), list(param.shape)
    return entry


class Failure(NamedTuple):
    """What went wrong on a rank, as every rank reports it."""

    text: str
    errno: int | None
    os_error: bool


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


def _write(tensors: dict[str, torch.Tensor], job: _Job) -> None:
    """Write this rank's file and fsync it (each rank its own: on several nodes rank 0 could not), keeping
    any error in the job: the commit reports it on every rank instead of leaving the others waiting."""
    path = job.tmp / job.file
    try:
        save_file(tensors, str(path))
        fsync_file(path)
        job.sha256 = sha256(path)
    except BaseException as e:  # surfaced at the commit, on every rank
        job.error = e


def _describe(error: BaseException, doing: str) -> Failure:
    """`error`, met while `doing` ("write rank00000.safetensors"), as every rank will report it."""
    if isinstance(error, OSError):
        text = f"could not {doing}: {error.strerror or error}"
        if error.errno == errno.ENOSPC:
            text += " (the disk is full: free some space or move checkpoint.dir)"
        return Failure(text, error.errno, True)
    return Failure(f"could not {doing}: {type(error).__name__}: {error}", None, False)


def _save_error(step: int, root: Path, failures: list[tuple[int, Failure]]) -> Exception:
    """The error every rank raises: an OSError (with its errno) when the first failure was one."""
    rank, first = failures[0]
    others = f" (ranks {[r for r, _ in failures]} failed)" if len(failures) > 1 else ""
    message = (
        f"checkpoint of step {step} was not saved: rank {rank} {first.text}{others}. The previous "
        f"checkpoint and `latest` in {str(root)!r} are kept"
    )
    if not first.os_error:
        return RuntimeError(message)
    return OSError(first.errno, message) if first.errno is not None else OSError(message)


def _agree(failure: Failure | None) -> Failure | None:
    """Rank 0's outcome of a step only it performs, on every rank (in place of a barrier)."""
    outcome = [failure]
    dist.broadcast_object_list(outcome, src=0)
    return outcome[0]


class Checkpointer:
    """Saves checkpoints of one run, synchronously or in the background.

    Asynchronous saving copies this rank's state to host memory (the only part the training step waits
    for) and writes the file on a thread; the commit (manifest, rename, `latest`) is collective, so it
    runs at the next save or at `finish()`, once every rank's file is on disk.

    A failed write (a full disk) on any rank fails the save on every rank with the same error: the
    temporary directory is removed, and the previous checkpoint and `latest` stay as they were.
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
        failure = None
        if mesh.rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)  # the remains of an earlier crash
                tmp.mkdir(parents=True)
            except OSError as e:
                failure = _describe(e, f"create {str(tmp)!r}")
        failure = _agree(failure)
        if failure is not None:
            raise _save_error(step, self.root, [(0, failure)])
        file = f"rank{mesh.rank:05d}.safetensors"
        # Everything the manifest says is taken now, not at the (possibly later) commit.
        job = _Job(step, consumed_samples, 0.0, file, tmp)
        tensors = _snapshot(state, job)
        if not self.asynchronous:
            _write(tensors, job)
            return self._commit(state, job)
        thread = threading.Thread(
            target=_write, args=(tensors, job), name=f"checkpoint-step-{step}", daemon=True
        )
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
        """Every rank's file is written: rank 0 writes the manifest, fsyncs the step and publishes it,
        then moves `latest`; or, if any rank failed, removes the temporary directory. Collective."""
        mesh = state.mesh
        mine = None if job.error is None else _describe(job.error, f"write {job.file}")
        gathered: list[Any] = [None] * mesh.world_size
        files = {job.file: job.sha256} if mine is None else {}
        dist.all_gather_object(gathered, (mine, job.entries, files))
        failures = [(rank, g[0]) for rank, g in enumerate(gathered) if g[0] is not None]
        final = self.root / f"step_{job.step}"
        if mesh.rank == 0:
            try:
                if not failures:
                    self._publish(state, job, gathered, final)
            except Exception as e:
                failures = [(0, _describe(e, f"commit {final.name} (manifest, rename, `latest`)"))]
            finally:
                shutil.rmtree(job.tmp, ignore_errors=True)  # gone after a rename; a failure's remains
        failure = _agree(failures[0][1] if failures else None)
        if failure is not None:
            failures = failures or [(0, failure)]
            raise _save_error(job.step, self.root, failures) from job.error
        return final

    def _publish(self, state: TrainState, job: _Job, gathered: list[Any], final: Path) -> None:
        config = state.config
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
        # Files and directory fsynced before the rename that commits the step, and the rename before
        # `latest` moves: after a power loss `latest` never names a step of empty files.
        publish_dir(job.tmp, final)
        write_atomic(self.root / "latest", final.name + "\n")
        prune(self.root, self.keep_last)


def save_checkpoint(
    state: TrainState, root: str | Path, *, step: int, consumed_samples: int, keep_last: int
) -> Path:
    """Write this step's checkpoint synchronously (collective: every rank calls it); returns its directory."""
    return Checkpointer(root, keep_last=keep_last).save(state, step=step, consumed_samples=consumed_samples)
