"""Tokenizing a stream of documents on several cores, in order, with bounded memory.

Why worker processes and not the ``tokenizers`` library's own threads (``encode_batch``): measured on
the 2-core machine this was written on (shared, so noisy), a pool of 2 processes and one
``encode_batch`` over every document ran at the same speed (1.66 vs 1.63 MB/s on Shakespeare), but
``encode_batch`` over the batches of 512 documents a stream must use fell to 1.22 MB/s, because its
threads join at the end of every batch while the parent reads and writes on its own. A pool overlaps
the two: the parent reads, parses and writes while the workers tokenize, and a worker also turns ids
into the on-disk dtype and appends EOS, work that would otherwise run on one core in the parent.
End to end, ``data prepare`` ran at 101% and 114% of ``encode_batch`` alone (20 and 100 MB,
bench/data_prepare.py). Each worker gets the parent's tokenizer rather than rebuilding it, and runs it
single-threaded, so N workers use N cores.

Order and memory: batches go to the workers as they are read and come back in submission order, so
the output is byte-identical for any number of workers; at most ``2 * workers`` batches are in flight,
so memory stays flat however large the corpus is (``Pool.imap`` would read the whole input ahead).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult

import numpy as np
from tokenizers import Tokenizer

BATCH_CHARS = 1 << 20  # about 1 MB of text per task: long enough to amortize the hand-off
BATCH_DOCS = 4096  # ... and never too many tiny documents in one task


@dataclass(frozen=True)
class Encoded:
    """One batch of documents, tokenized: every document's ids followed by EOS, joined."""

    tokens: np.ndarray  # (sum(lengths),) in the dataset's dtype
    lengths: np.ndarray  # (num_documents,) int64, EOS included
    num_bytes: int  # UTF-8 bytes of text the batch came from


def default_workers() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return max(os.cpu_count() or 1, 1)


class _Worker:
    """Per-process state: the tokenizer is loaded once, in the pool's initializer, not per batch."""

    tokenizer: Tokenizer | None = None
    eos = 0
    dtype = np.dtype(np.uint16)
    vocab_size = 0


def _init_worker(tokenizer: Tokenizer, eos: int, dtype: str, vocab_size: int) -> None:
    # The pool provides the parallelism; Rust threads inside each worker would only oversubscribe cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # The parent's tokenizer arrives by fork (or pickled, under spawn): rebuilding GPT-2's from its
    # vocabulary files would cost each worker about a second.
    _Worker.tokenizer = tokenizer
    tokenizer.encode_special_tokens = True  # as the parent's: pickling (spawn) drops the setting
    _Worker.eos, _Worker.dtype, _Worker.vocab_size = eos, np.dtype(dtype), vocab_size


def _encode(texts: list[str]) -> Encoded:
    tok = _Worker.tokenizer
    assert tok is not None, "worker used before its initializer ran"
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which we never use.
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encodings = encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    tokens = np.empty(int(lengths.sum()), dtype=_Worker.dtype)
    ends = np.cumsum(lengths)
    for encoding, end, length in zip(encodings, ends, lengths, strict=True):
        tokens[end - length : end - 1] = encoding.ids
        tokens[end - 1] = _Worker.eos
    assert not len(tokens) or int(tokens.max()) < _Worker.vocab_size, "id outside the vocabulary"
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return Encoded(tokens, lengths, num_bytes)


def _batched(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_documents(
    texts: Iterable[str], *, tokenizer: Tokenizer, eos: int, dtype: np.dtype, vocab_size: int, workers: int
) -> Iterator[Encoded]:
    """Tokenize ``texts`` in ``workers`` processes; yield the batches in input order.

    Reading ``texts`` (and any error it raises, e.g. a bad record) happens in the caller's process.
    """
    if workers < 1:
        raise ValueError(f"workers ({workers}) must be at least 1")
    # fork starts a worker in milliseconds; the workers touch no torch state, only the tokenizer.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(
        workers, initializer=_init_worker, initargs=(tokenizer, eos, dtype.name, vocab_size)
    ) as pool:
        pending: deque[AsyncResult[Encoded]] = deque()
        for batch in _batched(texts):
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
