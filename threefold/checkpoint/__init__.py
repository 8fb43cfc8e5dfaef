"""Sharded training checkpoints that resume exactly and load under any other layout.

A checkpoint is a directory `step_<N>/` holding

    rank<R>.safetensors   what rank R owns: fp32 master weights and Adam moments, keyed
                          `<param name>`, `<param name>::exp_avg`, `<param name>::exp_avg_sq`
                          (and its RNG state, `rng::cpu`, `rng::cuda`)
    manifest.json         format version, layout, model shape, step, data position, config, and for
                          every saved tensor: its file, TP shard coordinates and full (unpadded) size;
                          a SHA-256 per file

Each tensor is saved once: data-parallel rank 0 only, a replicated parameter by TP rank 0 only, a tied
embedding by the first pipeline stage only. Since every entry says which slice of which full tensor it
holds, a loader under any (tp, pp, dp, v) rebuilds the full tensor by name and keeps its own slice:
resharding needs no conversion step.

Saving writes into `.tmp-step_<N>/` and renames it only after every rank has written, the manifest is
complete and every file and the directory are fsynced; `latest` (a one-line file) moves last, atomically
and durably. A crash or a full disk mid-save leaves the previous checkpoint and `latest` untouched (and,
for a failed save, no temporary directory).

A manifest is read as untrusted input (checkpoint.schema): every key a reader uses is checked for
presence and type, and every file name it holds must stay inside the checkpoint directory
(`threefold.files.inside`), before anything is opened or hashed. Each problem is a ValueError naming the
checkpoint and the key, which is what resume catches to fall back to an older checkpoint.

The checkpoint sees the training state only through parts that save themselves (checkpoint.parts): the
model chunks' named parameters, the optimizer's `state_dict()` / `load_state_dict()` (which own the ZeRO
slicing and the moments' layout), the gradient syncs' `quiesce()`, and the RNG.

    parts.py      the protocols a training state meets (threefold.train.Trainer is one), the RNG part
    manifest.py   the manifest's format, checksums, and the checkpoints of a run directory
    schema.py     reading a manifest back: load_manifest, read_manifest, every key checked
    save.py       Checkpointer (synchronous or asynchronous saves), save_checkpoint
    load.py       full tensors rebuilt from any layout's shards, load_checkpoint
    convert.py    one-file checkpoints: write_full_checkpoint, convert_checkpoint, read_full_state
"""

from threefold.checkpoint.convert import convert_checkpoint, read_full_state, write_full_checkpoint
from threefold.checkpoint.load import load_checkpoint
from threefold.checkpoint.manifest import (
    FORMAT_VERSION,
    READABLE_VERSIONS,
    Manifest,
    checkpoints_newest_first,
    latest_checkpoint,
)
from threefold.checkpoint.parts import TrainState
from threefold.checkpoint.save import Checkpointer, save_checkpoint
from threefold.checkpoint.schema import load_manifest, read_manifest

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "Checkpointer",
    "Manifest",
    "TrainState",
    "checkpoints_newest_first",
    "convert_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_manifest",
    "read_full_state",
    "read_manifest",
    "save_checkpoint",
    "write_full_checkpoint",
]
