"""Token datasets: reading prepared datasets back and batching them deterministically (threefold.data.prepare
makes them).

A prepared dataset is a directory holding

    train.bin, val.bin   flat token ids, documents joined by the EOS id (uint16, or uint32 for
                         vocabularies over 65536 entries)
    meta.json            {"format_version": 1, "dtype", "vocab_size", "eos_token_id", "tokenizer",
                          "num_tokens": {"train": N, "val": M}, "num_documents", "sources",
                          "checksums": {"train.bin": "sha256:...", "val.bin": ...}}
                         (checksums since 2026-12; older datasets have none and still load)

Training samples are windows of ``seq_len + 1`` tokens cut from a split without overlap; inputs are
the first ``seq_len`` tokens and targets the last ``seq_len``. Batching is a pure function of
(seed, global sample position), so a run resumed from ``consumed_samples`` sees exactly the samples
that the uninterrupted run would have seen, whatever the data-parallel layout.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

FORMAT_VERSION = 1
SPLITS = ("train", "val")

Batch = tuple[torch.Tensor, torch.Tensor]


def file_checksum(path: str | Path) -> str:
    """ "sha256:<hex>" of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def verify_checksums(path: str | Path, meta: dict) -> dict[str, str]:
    """{file: problem} for each split file whose bytes differ from meta.json's "checksums" (empty: all
    match). A dataset prepared before checksums existed has none to compare: {"meta.json": ...}."""
    recorded = meta.get("checksums")
    if not isinstance(recorded, dict):
        return {"meta.json": "records no checksums (prepared by an older threefold)"}
    problems = {}
    for split in SPLITS:
        name = f"{split}.bin"
        expected = recorded.get(name)
        if not (Path(path) / name).is_file():
            problems[name] = "missing"
        elif file_checksum(Path(path) / name) != expected:
            problems[name] = f"bytes differ from meta.json's {expected}"
    return problems


def read_meta(path: str | Path) -> dict:
    """Read and check a prepared dataset's meta.json; ``path`` is the dataset directory."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        raise ValueError(
            f"{str(path)!r} is not a prepared dataset (no meta.json); run `threefold data prepare`"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(meta_path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{str(meta_path)!r} has format_version {version!r}, expected {FORMAT_VERSION}")
    missing = [k for k in ("dtype", "vocab_size", "eos_token_id", "tokenizer", "num_tokens") if k not in meta]
    if missing:
        raise ValueError(f"{str(meta_path)!r} lacks keys {missing}")
    counts = meta["num_tokens"]
    if not isinstance(counts, dict):
        raise ValueError(f"{str(meta_path)!r} has num_tokens {counts!r}, expected integer 'train' and 'val'")
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{str(meta_path)!r} has dtype {meta['dtype']!r}, expected 'uint16' or 'uint32'")
    fields = [("vocab_size", meta["vocab_size"], 1), ("eos_token_id", meta["eos_token_id"], 0)]
    fields += [(f"num_tokens.{s}", counts.get(s), 0) for s in SPLITS]
    for name, value, low in fields:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(
                f"{str(meta_path)!r} has {name} {value!r} ({type(value).__name__}), expected an integer "
                f">= {low}; re-run `threefold data prepare` to rebuild it"
            )
    if not isinstance(meta["tokenizer"], str):
        raise ValueError(f"{str(meta_path)!r} has tokenizer {meta['tokenizer']!r}, expected a name or path")
    return meta


class TokenDataset:
    """One split of a prepared dataset, memory-mapped, as non-overlapping (inputs, targets) samples."""

    def __init__(self, path: str | Path, split: str, seq_len: int) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} must be one of {list(SPLITS)}")
        if seq_len < 1:
            raise ValueError(f"seq_len ({seq_len}) must be at least 1")
        self.meta = read_meta(path)
        self.split = split
        self.seq_len = seq_len
        file = Path(path) / f"{split}.bin"
        dtype = np.dtype(self.meta["dtype"])
        size = file.stat().st_size if file.is_file() else 0
        expected = self.meta["num_tokens"][split]
        if size != expected * dtype.itemsize:
            raise ValueError(
                f"{str(file)!r} holds {size} bytes, but meta.json promises {expected} {dtype.name} tokens"
            )
        self.num_tokens = expected
        # A sample needs seq_len inputs plus one more token for the last target.
        if self.num_tokens < seq_len + 1:
            raise ValueError(
                f"{split} split of {str(path)!r} has {self.num_tokens} tokens, but one sample of "
                f"seq_len {seq_len} needs {seq_len + 1}"
            )
        self.tokens = np.memmap(file, dtype=dtype, mode="r")
        self.num_samples = (self.num_tokens - 1) // seq_len

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Batch:
        inputs, targets = self.get_batch(np.array([index]))
        return inputs[0], targets[0]

    def get_batch(self, indices: np.ndarray) -> Batch:
        """Stack the samples at ``indices`` into (inputs, targets), each int64 of shape (n, seq_len)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(
                f"sample indices must lie in [0, {self.num_samples}), got some in "
                f"[{indices.min()}, {indices.max()}]"
            )
        offsets = indices[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # (n, seq_len + 1)
        window = torch.from_numpy(np.asarray(self.tokens[offsets], dtype=np.int64))
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def check_dataset(path: str | Path, *, model_vocab_size: int, scan: bool = True) -> dict:
    """Stop a run at start-up on a dataset that would train on garbage; returns the meta.

    Checks that meta.json's vocabulary fits the model and its dtype, that each split's file holds
    exactly the tokens meta.json promises (catches truncation and a wrong dtype), and with `scan`, that
    every token id lies below the vocabulary size (catches corruption; reads each file once, about a
    second per GB, so the caller runs it on one rank). Every error names the file, the values and a fix.
    """
    meta = read_meta(path)
    vocab, dtype = meta["vocab_size"], np.dtype(meta["dtype"])
    redo = "re-run `threefold data prepare` to rebuild it"
    if not isinstance(vocab, int) or vocab <= 0:
        raise ValueError(f"{str(path)!r}: meta.json has vocab_size {vocab!r}, expected a positive integer")
    if vocab > np.iinfo(dtype).max + 1:
        raise ValueError(
            f"{str(path)!r}: meta.json says dtype {dtype.name} but vocab_size {vocab} needs more than "
            f"{dtype.name} holds (max id {np.iinfo(dtype).max}); {redo}"
        )
    if vocab > model_vocab_size:
        raise ValueError(
            f"{str(path)!r} was tokenized with a vocabulary of {vocab} ids but model.vocab_size is "
            f"{model_vocab_size}: ids >= {model_vocab_size} have no embedding. Set model.vocab_size >= "
            f"{vocab}, or prepare the data with the model's tokenizer"
        )
    if not 0 <= meta["eos_token_id"] < vocab:
        raise ValueError(
            f"{str(path)!r}: eos_token_id {meta['eos_token_id']} is outside [0, {vocab}); {redo}"
        )
    for split in SPLITS:
        file = Path(path) / f"{split}.bin"
        if not file.is_file():
            raise ValueError(f"{str(file)!r} is missing; {redo}")
        size, expected = file.stat().st_size, meta["num_tokens"][split]
        if size != expected * dtype.itemsize:
            hint = "truncated or still being copied" if size < expected * dtype.itemsize else "longer"
            raise ValueError(
                f"{str(file)!r} holds {size} bytes, but meta.json promises {expected} {dtype.name} tokens "
                f"= {expected * dtype.itemsize} bytes (the file is {hint}, or meta.json belongs to another "
                f"file or dtype); {redo}"
            )
        if scan and expected:
            tokens = np.memmap(file, dtype=dtype, mode="r")
            chunk = 1 << 24
            for start in range(0, expected, chunk):
                block = tokens[start : start + chunk]
                if int(block.max()) >= vocab:
                    at = int(np.argmax(block >= vocab))
                    raise ValueError(
                        f"{str(file)!r} is corrupt: token {start + at} has id {int(block[at])}, outside the "
                        f"vocabulary of {vocab} ids (meta.json); {redo}"
                    )
            del tokens
    return meta


class SampleLoader(Protocol):
    """What the training loop and checkpoints need of a loader (BatchLoader, blend.BlendLoader)."""

    @property
    def consumed_samples(self) -> int: ...

    def next_batch(self) -> list[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _check_dp(dp_rank: int, dp_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank ({dp_rank}) must lie in [0, dp_size ({dp_size}))")


def check_batching(
    micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int, seed: int, start_sample: int
) -> None:
    """ValueError unless the arguments describe a loader: the global batch splits into whole micro-batches
    on every DP rank, and the seed and the start are non-negative."""
    _check_dp(dp_rank, dp_size)
    if micro_batch_size < 1 or global_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be a positive multiple of "
            f"micro_batch_size ({micro_batch_size}) * dp_size ({dp_size})"
        )
    if seed < 0:
        raise ValueError(f"seed ({seed}) must be non-negative")
    if start_sample < 0:
        raise ValueError(f"start_sample ({start_sample}) must be non-negative")


def _split_micro_batches(dataset: TokenDataset, indices: np.ndarray, micro_batch_size: int) -> list[Batch]:
    inputs, targets = dataset.get_batch(indices)
    return list(zip(inputs.split(micro_batch_size), targets.split(micro_batch_size), strict=True))


class BatchLoader:
    """Deterministic training batches, sharded over data-parallel ranks.

    The global sample stream maps position k to sample ``perm(seed, k // N)[k % N]`` with N the
    dataset's sample count: every epoch is a fresh permutation (the identity without shuffling).
    Each optimizer step takes the next ``global_batch_size`` positions; DP rank r takes the r-th
    contiguous slice of them and cuts it into micro-batches. Everything depends only on
    ``consumed_samples``, which is the same on every rank and is all a checkpoint needs.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        start_sample: int = 0,
        shuffle: bool = True,
    ) -> None:
        check_batching(micro_batch_size, global_batch_size, dp_rank, dp_size, seed, start_sample)
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self._consumed = start_sample
        self._perms: dict[int, np.ndarray] = {}

    @property
    def consumed_samples(self) -> int:
        """Samples consumed by all DP ranks together; the resume point for a new loader."""
        return self._consumed

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # A step's block spans at most two epochs, so only the newest two are kept.
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            n = self.dataset.num_samples
            rng = np.random.default_rng((self.seed, epoch))
            self._perms[epoch] = rng.permutation(n) if self.shuffle else np.arange(n)
        return self._perms[epoch]

    def sample_indices(self, positions: np.ndarray) -> np.ndarray:
        """Dataset sample indices at the given global stream positions."""
        n = self.dataset.num_samples
        epochs, offsets = np.divmod(positions, n)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[offsets[mask]]
        return out

    def next_batch(self) -> list[Batch]:
        """This rank's micro-batches for one optimizer step, each (inputs, targets) of (mbs, seq_len)."""
        per_rank = self.global_batch_size // self.dp_size
        start = self._consumed + self.dp_rank * per_rank
        indices = self.sample_indices(np.arange(start, start + per_rank, dtype=np.int64))
        self._consumed += self.global_batch_size
        return _split_micro_batches(self.dataset, indices, self.micro_batch_size)

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self._consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.dataset.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["consumed_samples"]``; the stream must be the one the state came from."""
        mine = self.state_dict()
        for key in ("seed", "shuffle", "num_samples"):
            if state.get(key, mine[key]) != mine[key]:
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has {key}={mine[key]!r}; "
                    "resuming would not continue the same sample stream"
                )
        self._consumed = int(state["consumed_samples"])


def eval_batches(
    dataset: TokenDataset, *, num_sequences: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[Batch]:
    """This DP rank's share of the first ``num_sequences`` samples of ``dataset``, unshuffled, in
    micro-batches of ``micro_batch_size`` (the last one may be smaller).

    Rank r scores the r-th contiguous slice of them, so every layout (any dp size, any micro-batch size)
    evaluates the same sequences. A split smaller than ``num_sequences`` is scored whole, never twice.
    """
    _check_dp(dp_rank, dp_size)
    if micro_batch_size < 1 or num_sequences < 1:
        raise ValueError(
            f"micro_batch_size ({micro_batch_size}) and num_sequences ({num_sequences}) must be at least 1"
        )
    total = min(num_sequences, dataset.num_samples)
    if total < dp_size:
        raise ValueError(
            f"the validation split holds {dataset.num_samples} sequence(s) and training.eval_sequences is "
            f"{num_sequences}: fewer than the {dp_size} data-parallel ranks that share them"
        )
    first, last = dp_rank * total // dp_size, (dp_rank + 1) * total // dp_size
    return _split_micro_batches(dataset, np.arange(first, last, dtype=np.int64), micro_batch_size)


# ---------------------------------------------------------------------------------------------
# Command line: threefold data prepare ...
# ---------------------------------------------------------------------------------------------
