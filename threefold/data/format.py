"""The prepared-dataset format on disk, and reading and checking it without torch (threefold.data.prepare
writes it; threefold.data.dataset batches it for training).

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
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype("<u8")


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


def check_dataset(path: str | Path, *, model_vocab_size: int, scan: bool = True) -> dict:
    """Stop a run at start-up on a dataset that would train on garbage; returns the meta.

    Checks that meta.json's vocabulary fits the model and its dtype, that each split's file holds
    exactly the tokens meta.json promises (catches truncation and a wrong dtype), that each format-2 index
    has one offset per document plus one and runs from 0 to the split's token count, and with `scan`, that
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
