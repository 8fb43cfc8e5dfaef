"""`threefold data inspect DIR`: what a prepared dataset holds, without training on it.

Per split: tokens, documents (found at the EOS ids that close them; a split's last document may be cut by
the train/val split and have none), and a histogram of document lengths in powers of two. Then a decoded
sample: the first tokens of one document, through the tokenizer named in meta.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from threefold.data.dataset import SPLITS, check_dataset, verify_checksums

CHUNK = 1 << 24  # tokens scanned at a time, so memory stays flat for any size


def document_lengths(tokens: np.ndarray, eos: int) -> np.ndarray:
    """Lengths (EOS included) of the documents of a token array; a tail without EOS counts as one more."""
    ends: list[np.ndarray] = []
    for start in range(0, len(tokens), CHUNK):
        ends.append(np.flatnonzero(tokens[start : start + CHUNK] == eos) + start)
    stops = np.concatenate([*ends, np.empty(0, dtype=np.int64)]) + 1
    if len(tokens) and (not len(stops) or stops[-1] != len(tokens)):
        stops = np.append(stops, len(tokens))
    return np.diff(np.concatenate([[0], stops])).astype(np.int64)


def histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(low, high, count) per power-of-two bucket [low, high) holding any document."""
    if not len(lengths):
        return []
    exponents = np.floor(np.log2(np.maximum(lengths, 1))).astype(int)
    counts = np.bincount(exponents)
    return [(2**e, 2 ** (e + 1), int(c)) for e, c in enumerate(counts) if c]


def inspect_dataset(
    path: str | Path, *, sample: int = 0, sample_tokens: int = 64, verify: bool = False
) -> dict[str, Any]:
    """The report as a dict (what `--json` prints); with `verify`, "checksums" maps each file whose
    bytes differ from meta.json's checksum to the problem (empty when all match)."""
    meta = check_dataset(path, model_vocab_size=2**63, scan=False)
    eos = meta["eos_token_id"]
    report: dict[str, Any] = {
        "path": str(path),
        "tokenizer": meta["tokenizer"],
        "vocab_size": meta["vocab_size"],
    }
    report["eos_token_id"] = eos
    splits: dict[str, Any] = {}
    sample_ids: list[int] = []
    for split in SPLITS:
        tokens = np.memmap(Path(path) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        lengths = document_lengths(tokens, eos) if len(tokens) else np.empty(0, dtype=np.int64)
        splits[split] = {
            "tokens": int(len(tokens)),
            "documents": int(len(lengths)),
            "mean_document_tokens": float(lengths.mean()) if len(lengths) else 0.0,
            "max_document_tokens": int(lengths.max()) if len(lengths) else 0,
            "histogram": [{"from": lo, "below": hi, "documents": n} for lo, hi, n in histogram(lengths)],
        }
        if split == "train" and len(lengths):
            if not 0 <= sample < len(lengths):
                raise ValueError(
                    f"--sample {sample} is out of range: the train split holds {len(lengths)} documents"
                )
            start = int(lengths[:sample].sum())
            sample_ids = [int(t) for t in tokens[start : start + min(sample_tokens, int(lengths[sample]))]]
        del tokens
    report["splits"] = splits
    if verify:
        report["checksums"] = verify_checksums(path, meta)
    report["sample"] = {
        "document": sample,
        "token_ids": sample_ids,
        "text": _decode(meta["tokenizer"], sample_ids),
    }
    return report


def _decode(tokenizer: str, ids: list[int]) -> str | None:
    """The text of `ids`, or None when the tokenizer meta.json names cannot be loaded here."""
    from threefold.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(None if tokenizer == "gpt2" else tokenizer)
    except (ValueError, OSError, RuntimeError):
        return None
    return tok.decode(ids, skip_special_tokens=False)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['path']}: tokenizer {report['tokenizer']}, vocabulary {report['vocab_size']:,}"]
    for split, s in report["splits"].items():
        lines.append(
            f"{split}: {s['tokens']:,} tokens in {s['documents']:,} documents "
            f"(mean {s['mean_document_tokens']:,.1f}, longest {s['max_document_tokens']:,} tokens)"
        )
        widest = max((b["documents"] for b in s["histogram"]), default=1)
        for b in s["histogram"]:
            bar = "#" * max(1, round(40 * b["documents"] / widest))
            lines.append(f"  {b['from']:>9,} - {b['below'] - 1:>9,} tokens  {b['documents']:>9,}  {bar}")
    if "checksums" in report:
        problems = report["checksums"]
        lines.append(
            "checksums: "
            + ("all match" if not problems else "; ".join(f"{k} {v}" for k, v in problems.items()))
        )
    sample = report["sample"]
    if sample["token_ids"]:
        text = sample["text"] if sample["text"] is not None else "(tokenizer not available here)"
        lines.append(f"train document {sample['document']}, first {len(sample['token_ids'])} tokens:")
        lines.append(text)
    return "\n".join(lines)


def inspect_main(argv: list[str]) -> int:
    """``threefold data inspect``: print what a prepared dataset holds."""
    parser = argparse.ArgumentParser(
        prog="threefold data inspect",
        description="Tokens, documents, document lengths and a decoded sample of a prepared dataset.",
    )
    parser.add_argument("path", metavar="DIR", help="a directory made by `threefold data prepare`")
    parser.add_argument("--sample", type=int, default=0, metavar="K", help="decode the K-th train document")
    parser.add_argument("--tokens", type=int, default=64, metavar="N", help="tokens of it to decode")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--verify", action="store_true", help="check the files against meta.json's checksums")
    args = parser.parse_args(argv)
    try:
        report = inspect_dataset(args.path, sample=args.sample, sample_tokens=args.tokens, verify=args.verify)
    except ValueError as exc:
        print(f"threefold data inspect: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report.get("checksums") else 0
