"""Token datasets: reading prepared datasets back and batching them deterministically (threefold.data.prepare
makes them).

A prepared dataset (format 2) is a directory holding

    train.bin, val.bin   flat token ids, documents joined by the EOS id (uint16, or uint32 for
                         vocabularies over 65536 entries), memory-mapped for training
    train.idx, val.idx   little-endian uint64 document offsets into the .bin of the same split: the
                         start of each document, then the end of the last (num_documents + 1 entries,
                         the first 0, the last num_tokens), so a document is found without scanning
    meta.json            {"format_version": 2, "dtype", "vocab_size", "eos_token_id", "tokenizer",
                          "num_tokens": {"train": N, "val": M}, "num_documents": {"train", "val"},
                          "checksums": {"train.bin": "sha256:<hex>", ... one per .bin and .idx},
                          "sources": [the inputs, in order]}

The split falls on a document boundary: val holds the last documents, about val_fraction of the
tokens. Only a dataset of one document is cut mid-document (each split's index then holds that one,
partial, document). Format 1 (no .idx files, no checksums, num_documents one total) is still read.

Training samples are windows of ``seq_len + 1`` tokens cut from a split without overlap; inputs are
the first ``seq_len`` tokens and targets the last ``seq_len``. Batching is a pure function of
(seed, global sample position), so a run resumed from ``consumed_samples`` sees exactly the samples
that the uninterrupted run would have seen, whatever the data-parallel layout.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype("<u8")

Batch = tuple[torch.Tensor, torch.Tensor]


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
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise ValueError(
            f"{str(meta_path)!r} has format_version {version!r}, expected one of {list(READABLE_VERSIONS)}"
        )
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
    if version >= 2:
        documents, checksums = meta.get("num_documents"), meta.get("checksums")
        if not isinstance(documents, dict) or not all(
            isinstance(documents.get(s), int) and not isinstance(documents.get(s), bool) for s in SPLITS
        ):
            raise ValueError(
                f"{str(meta_path)!r} has num_documents {documents!r}, expected integer 'train' and 'val'"
            )
        if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
            raise ValueError(f"{str(meta_path)!r} has checksums {checksums!r}, expected file name -> digest")
    return meta


def read_index(path: str | Path, split: str) -> np.ndarray | None:
    """The document offsets of one split (memory-mapped, num_documents + 1 entries), or None for a
    format-1 dataset, which has no index."""
    meta = read_meta(path)
    if meta["format_version"] < 2:
        return None
    return np.memmap(Path(path) / f"{split}.idx", dtype=INDEX_DTYPE, mode="r")


def dataset_files(meta: dict) -> list[str]:
    """The data files a dataset of this meta holds (meta.json aside)."""
    names = [f"{split}.bin" for split in SPLITS]
    if meta["format_version"] >= 2:
        names += [f"{split}.idx" for split in SPLITS]
    return names


def verify_checksums(path: str | Path) -> dict[str, bool | None]:
    """Re-hash every data file and compare with meta.json: name -> True (matches), False, or None
    (format 1 records no checksum). Reads every byte, so it is for `data inspect --verify`, not start-up."""
    meta = read_meta(path)
    result: dict[str, bool | None] = {}
    for name in dataset_files(meta):
        expected = meta.get("checksums", {}).get(name)
        if expected is None:
            result[name] = None
            continue
        digest = hashlib.sha256()
        with (Path(path) / name).open("rb") as f:
            while chunk := f.read(16 << 20):
                digest.update(chunk)
        result[name] = "sha256:" + digest.hexdigest() == expected
    return result


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
        if meta["format_version"] >= 2:
            _check_index(Path(path), split, meta, redo)
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


def _check_index(path: Path, split: str, meta: dict, redo: str) -> None:
    """The cheap half of an index check: its size and its first and last offsets, not every entry."""
    file = path / f"{split}.idx"
    num_documents, num_tokens = meta["num_documents"][split], meta["num_tokens"][split]
    size = file.stat().st_size if file.is_file() else None
    if size != (num_documents + 1) * INDEX_DTYPE.itemsize:
        raise ValueError(
            f"{str(file)!r} holds {size} bytes, but meta.json promises {num_documents} documents = "
            f"{(num_documents + 1) * INDEX_DTYPE.itemsize} bytes of offsets; {redo}"
        )
    index = np.memmap(file, dtype=INDEX_DTYPE, mode="r")
    first, last = int(index[0]), int(index[-1])
    del index
    if first != 0 or last != num_tokens:
        raise ValueError(
            f"{str(file)!r} runs from offset {first} to {last}, but {split}.bin holds {num_tokens} tokens "
            f"(expected 0 to {num_tokens}); {redo}"
        )


def _check_dp(dp_rank: int, dp_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank ({dp_rank}) must lie in [0, dp_size ({dp_size}))")


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
