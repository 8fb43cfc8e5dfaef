"""Writing a dataset's token and index files, split on a document boundary, with checksums.

The writer streams every new document into train.bin (and its end offset into train.idx) as it
arrives, because the split point is only known once the last document is in. Then the tail from the
split on moves to val.bin / val.idx and train.bin / train.idx are truncated. An append starts from a
copy of the existing files and adds the new documents' train part to train and their val part to val.

Checksums (sha256, so `sha256sum train.bin` checks a file by hand) are computed as bytes are written,
never by reading a finished file again. Truncation is what makes that hard, since a hash cannot be
rewound: so the writer keeps a copy of both hash states at each batch boundary that could still
precede the split, and on truncation resumes the copy just before the split and hashes at most one
batch again. Only boundaries after the latest one below ``(1 - val_fraction)`` of the tokens so far
can precede the final split (which lies at or after that point's document boundary), so older copies
are dropped and the list stays short.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from threefold.data.format import INDEX_DTYPE

CHUNK = 16 << 20


class HashedFile:
    """A file written append-only, its sha256 kept up to date; it can be cut back to an earlier state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("wb+")
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.hash.update(data)
        self.size += len(data)

    def copy_from(self, source: Path) -> None:
        with source.open("rb") as f:
            while chunk := f.read(CHUNK):
                self.write(chunk)

    def state(self) -> tuple[int, Any]:
        return self.size, self.hash.copy()

    def cut(self, size: int, state: tuple[int, Any]) -> None:
        """Truncate to ``size`` bytes, re-hashing from ``state`` (taken at or before ``size``)."""
        start, hasher = state
        assert start <= size <= self.size, (start, size, self.size)
        self.file.flush()
        self.file.seek(start)
        remaining = size - start
        while remaining:
            chunk = self.file.read(min(CHUNK, remaining))
            hasher.update(chunk)
            remaining -= len(chunk)
        self.file.truncate(size)
        self.file.seek(size)
        self.hash, self.size = hasher.copy(), size

    def read(self, start: int, stop: int) -> bytes:
        self.file.flush()
        self.file.seek(start)
        data = self.file.read(stop - start)
        self.file.seek(self.size)
        return data

    def close(self) -> str:
        self.file.close()
        return "sha256:" + self.hash.hexdigest()


class DatasetWriter:
    """Builds train/val .bin and .idx in ``out_dir``, optionally continuing an existing dataset.

    ``base`` is the existing dataset's (directory, meta) for an append; its files are copied (and
    their checksums checked on the way) before the new documents follow.
    """

    def __init__(
        self, out_dir: Path, *, dtype: np.dtype, val_fraction: float, base: tuple[Path, dict] | None = None
    ) -> None:
        self.dtype = dtype
        self.val_fraction = val_fraction
        self.files = {
            name: HashedFile(out_dir / name) for name in ("train.bin", "train.idx", "val.bin", "val.idx")
        }
        self.base_tokens = {"train": 0, "val": 0}
        self.base_documents = {"train": 0, "val": 0}
        if base is None:
            for split in ("train", "val"):
                self.files[f"{split}.idx"].write(np.zeros(1, INDEX_DTYPE).tobytes())
        else:
            base_dir, meta = base
            for name, file in self.files.items():
                file.copy_from(base_dir / name)
                expected = meta["checksums"].get(name)
                if expected is not None and file.state()[1].hexdigest() != expected.removeprefix("sha256:"):
                    raise ValueError(
                        f"{str(base_dir / name)!r} does not match its checksum in meta.json ({expected}); "
                        "the existing dataset is damaged, so nothing was appended. Re-prepare it"
                    )
            self.base_tokens = dict(meta["num_tokens"])
            self.base_documents = dict(meta["num_documents"])
        self.num_tokens = 0  # new tokens written
        self.num_documents = 0
        self.num_bytes = 0
        self._states: list[tuple[int, int, tuple[int, Any], tuple[int, Any]]] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, num_bytes: int = 0) -> None:
        """Append a batch of whole documents (``lengths`` include each one's EOS)."""
        bin_file, idx_file = self.files["train.bin"], self.files["train.idx"]
        self._states.append((self.num_tokens, self.num_documents, bin_file.state(), idx_file.state()))
        bin_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        ends = self.base_tokens["train"] + self.num_tokens + np.cumsum(lengths, dtype=np.int64)
        idx_file.write(ends.astype(INDEX_DTYPE).tobytes())
        self.num_tokens += len(tokens)
        self.num_documents += len(lengths)
        self.num_bytes += num_bytes
        # Drop the states that can no longer precede the split (see the module docstring).
        floor = (1 - self.val_fraction) * self.num_tokens
        keep = max((i for i, s in enumerate(self._states) if s[0] <= floor), default=0)
        del self._states[:keep]

    def _split(self) -> tuple[int, int]:
        """(new documents, new tokens) that go to train; the rest of the new ones go to val."""
        total = self.num_tokens
        if self.num_documents == 1:
            # One document cannot be split between documents: cut its tokens instead, as format 1 did.
            num_val = min(max(round(total * self.val_fraction), 1), total - 1)
            return 1, total - num_val
        self.files["train.idx"].file.flush()
        idx = np.memmap(self.files["train.idx"].path, dtype=INDEX_DTYPE, mode="r")
        first = self.base_documents["train"] + 1  # the first new document's end offset
        ends = idx[first : first + self.num_documents]
        target = self.base_tokens["train"] + (1 - self.val_fraction) * total
        # The boundary nearest the target, keeping at least one new document on each side.
        k = int(np.searchsorted(ends, target))
        candidates = [c for c in (k, k + 1) if 1 <= c <= self.num_documents - 1]
        if not candidates:
            candidates = [1 if k < 1 else self.num_documents - 1]
        best = min(candidates, key=lambda c: abs(float(ends[c - 1]) - target))
        split_tokens = int(ends[best - 1]) - self.base_tokens["train"]
        del idx
        return best, split_tokens

    def finish(self) -> dict:
        """Split, truncate and close every file; return counts and checksums for meta.json."""
        if self.num_documents == 0:
            raise ValueError("no documents to write")
        if self.num_tokens < 2:
            raise ValueError(f"the new documents hold {self.num_tokens} token(s); a split needs at least 2")
        num_train_docs, split = self._split()
        item = self.dtype.itemsize
        base_train = self.base_tokens["train"]
        bin_file, idx_file = self.files["train.bin"], self.files["train.idx"]
        state = max((s for s in self._states if s[0] <= split), key=lambda s: s[0])
        _, state_docs, bin_state, idx_state = state

        # val gets the new tokens from the split on, and their document ends shifted to val's offsets.
        val_bin, val_idx = self.files["val.bin"], self.files["val.idx"]
        for start in range((base_train + split) * item, bin_file.size, CHUNK):
            val_bin.write(bin_file.read(start, min(start + CHUNK, bin_file.size)))
        offset = self.base_tokens["val"] - split - base_train
        first = self.base_documents["train"] + 1 + num_train_docs  # idx entry of the first val doc's end
        if self.num_documents == 1:
            val_idx.write(
                np.array([self.base_tokens["val"] + self.num_tokens - split], INDEX_DTYPE).tobytes()
            )
        else:
            last = self.base_documents["train"] + 1 + self.num_documents
            for lo in range(first, last, CHUNK // 8):
                hi = min(lo + CHUNK // 8, last)
                ends = np.frombuffer(idx_file.read(lo * 8, hi * 8), dtype=INDEX_DTYPE).astype(np.int64)
                val_idx.write((ends + offset).astype(INDEX_DTYPE).tobytes())

        bin_file.cut((base_train + split) * item, bin_state)
        if self.num_documents == 1:  # the one document's train part ends at the split
            idx_file.cut((self.base_documents["train"] + 1) * 8, idx_state)
            idx_file.write(np.array([base_train + split], INDEX_DTYPE).tobytes())
        else:
            assert state_docs <= num_train_docs
            idx_file.cut((self.base_documents["train"] + 1 + num_train_docs) * 8, idx_state)

        num_val_docs = self.num_documents - num_train_docs if self.num_documents > 1 else 1
        checksums = {name: file.close() for name, file in self.files.items()}
        return {
            "num_tokens": {
                "train": base_train + split,
                "val": self.base_tokens["val"] + self.num_tokens - split,
            },
            "num_documents": {
                "train": self.base_documents["train"] + num_train_docs,
                "val": self.base_documents["val"] + num_val_docs,
            },
            "checksums": checksums,
        }

    def close(self) -> None:
        for file in self.files.values():
            if not file.file.closed:
                file.file.close()
