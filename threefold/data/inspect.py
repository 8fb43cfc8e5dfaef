"""``threefold data inspect DIR``: what a prepared dataset holds, at a glance or as JSON.

Tokens and documents per split, a histogram of document lengths (log-spaced buckets, read from the
.idx files, so it costs a few bytes per document), the tokenizer, the state of the checksums
(``--verify`` re-hashes every file), and one document's first tokens decoded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from threefold.data.format import SPLITS, check_dataset, read_index, read_meta, verify_checksums
from threefold.data.tokenizer import load_tokenizer

CHUNK = 1 << 22  # index entries (or format-1 tokens) read at a time: memory stays flat on any dataset
BUCKETS = 64  # power-of-two length buckets: [0, 1), [1, 2), [2, 4), ... cover any uint64 length


def _length_chunks(path: Path, meta: dict, split: str) -> Iterator[np.ndarray]:
    """Every document length of a split (EOS included), a chunk at a time."""
    index = read_index(path, split)
    if index is not None:
        for start in range(0, len(index) - 1, CHUNK):
            yield np.diff(np.asarray(index[start : start + CHUNK + 1], dtype=np.int64))
        return
    # Format 1 has no index: documents end at EOS tokens (and a last one may lack its EOS).
    tokens = np.memmap(path / f"{split}.bin", dtype=meta["dtype"], mode="r")
    previous_end = 0
    for start in range(0, len(tokens), CHUNK):
        ends = start + np.flatnonzero(tokens[start : start + CHUNK] == meta["eos_token_id"]) + 1
        if start + CHUNK >= len(tokens) and (not len(ends) or ends[-1] != len(tokens)):
            ends = np.append(ends, len(tokens))
        yield np.diff(ends, prepend=previous_end)
        previous_end = int(ends[-1]) if len(ends) else previous_end


def length_stats(chunks: Iterable[np.ndarray]) -> dict:
    """Count, mean, max and a power-of-two histogram ([lo, hi) buckets, the empty ones between the
    first and the last non-empty bucket kept) of document lengths."""
    counts = np.zeros(BUCKETS, dtype=np.int64)
    total = num_documents = longest = 0
    for lengths in chunks:
        if not len(lengths):
            continue
        # Bucket b holds [2^(b-1), 2^b) for b >= 1, bucket 0 holds length 0.
        buckets = np.where(lengths > 0, np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64) + 1, 0)
        counts += np.bincount(buckets, minlength=BUCKETS)[:BUCKETS]
        total += int(lengths.sum())
        num_documents += len(lengths)
        longest = max(longest, int(lengths.max()))
    used = np.flatnonzero(counts)
    histogram = []
    if len(used):
        for b in range(int(used[0]), int(used[-1]) + 1):
            low, high = (0, 1) if b == 0 else (1 << (b - 1), 1 << b)
            histogram.append({"min": low, "max": high, "documents": int(counts[b])})
    return {
        "documents": num_documents,
        "mean_document_tokens": total / num_documents if num_documents else 0.0,
        "max_document_tokens": longest,
        "histogram": histogram,
    }


def _sample(path: Path, meta: dict, split: str, document: int, num_tokens: int) -> dict:
    index = read_index(path, split)
    count = len(index) - 1 if index is not None else None
    if count is not None and not 0 <= document < count:
        raise ValueError(f"--sample {document} is outside the {count} documents of the {split} split")
    tokens = np.memmap(path / f"{split}.bin", dtype=meta["dtype"], mode="r")
    start = int(index[document]) if index is not None else 0
    stop = int(index[document + 1]) if index is not None else len(tokens)
    ids = np.asarray(tokens[start : min(stop, start + num_tokens)], dtype=np.int64).tolist()
    try:
        text = load_tokenizer(meta["tokenizer"]).decode(ids, skip_special_tokens=False)
    except ValueError as exc:
        text = f"(tokenizer {meta['tokenizer']!r} could not be loaded to decode: {exc})"
    return {"split": split, "document": document, "start": start, "ids": ids, "text": text}


def inspect_dataset(path: str | Path, *, sample: int = 0, num_tokens: int = 64, verify: bool = False) -> dict:
    """A report on the dataset at ``path``: the facts `data inspect` prints, as a JSON-ready dict."""
    path = Path(path)
    meta = read_meta(path)
    check_dataset(path, model_vocab_size=meta["vocab_size"], scan=False)
    splits = {}
    for split in SPLITS:
        splits[split] = {
            "tokens": meta["num_tokens"][split],
            **length_stats(_length_chunks(path, meta, split)),
        }
    if meta["format_version"] < 2:
        checksums = "none (format 1)"
    elif verify:
        results = verify_checksums(path)
        bad = sorted(name for name, ok in results.items() if ok is False)
        checksums = f"MISMATCH: {', '.join(bad)}" if bad else "verified"
    else:
        checksums = "recorded (not verified; pass --verify)"
    return {
        "path": str(path),
        "format_version": meta["format_version"],
        "tokenizer": meta["tokenizer"],
        "vocab_size": meta["vocab_size"],
        "dtype": meta["dtype"],
        "eos_token_id": meta["eos_token_id"],
        "splits": splits,
        "checksums": checksums,
        "sources": meta.get("sources", []),
        "sample": _sample(path, meta, "train", sample, num_tokens),
    }


def format_report(report: dict) -> str:
    """The report as text for a terminal."""
    lines = [
        f"dataset   {report['path']} (format {report['format_version']})",
        f"tokenizer {report['tokenizer']} (vocab {report['vocab_size']:,}, eos {report['eos_token_id']}, "
        f"{report['dtype']})",
        f"checksums {report['checksums']}",
        f"sources   {len(report['sources'])} input(s)",
    ]
    for split, facts in report["splits"].items():
        lines.append(
            f"{split:5} {facts['tokens']:>14,} tokens {facts['documents']:>10,} documents "
            f"(mean {facts['mean_document_tokens']:,.1f}, max {facts['max_document_tokens']:,} tokens)"
        )
        peak = max((b["documents"] for b in facts["histogram"]), default=1)
        for bucket in facts["histogram"]:
            bar = "#" * round(40 * bucket["documents"] / peak)
            span = f"[{bucket['min']:,}, {bucket['max']:,})"
            lines.append(f"  {span:>22} {bucket['documents']:>10,} {bar}")
    sample = report["sample"]
    lines.append(
        f"sample: {sample['split']} document {sample['document']} (token {sample['start']:,}), "
        f"first {len(sample['ids'])} tokens:"
    )
    lines.append(repr(sample["text"]))
    return "\n".join(lines)


def inspect_main(argv: list[str]) -> int:
    """``threefold data inspect DIR``."""
    parser = argparse.ArgumentParser(
        prog="threefold data inspect",
        description="Show a prepared dataset: tokens and documents per split, document lengths, tokenizer, "
        "checksums, and a decoded sample.",
    )
    parser.add_argument("path", metavar="DIR", help="prepared dataset directory")
    parser.add_argument("--sample", type=int, default=0, metavar="K", help="train document to decode (0)")
    parser.add_argument("--tokens", type=int, default=64, metavar="N", help="tokens of it to decode (64)")
    parser.add_argument("--verify", action="store_true", help="re-hash every file against its checksum")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.tokens < 0:
        parser.error(f"--tokens ({args.tokens}) must be non-negative")
    try:
        report = inspect_dataset(args.path, sample=args.sample, num_tokens=args.tokens, verify=args.verify)
    except ValueError as exc:
        print(f"threefold data inspect: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["checksums"].startswith("MISMATCH") else 0
