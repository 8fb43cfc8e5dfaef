import json
import os

# torch.compile's kernels built in this process, not by a pool of compile workers: a rank forked from a
# process that has started that pool inherits the pool's handle without its threads, and its first compile
# then waits for ever (seen with a cold compile cache: tests/test_fp8.py's compiles in the runner, then a
# forked rank's compile in tests/test_generate.py). Set before torch is imported, which reads it.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import run_ranks, train_and_gather, train_merged
from tiny import ckpt_config

from threefold.config import Config
from threefold.data.prepare import prepare_dataset

# One intra-op thread per process: the multi-rank tests fork several ranks onto two cores.
torch.set_num_threads(1)

SONNETS = Path(__file__).parent / "data" / "sonnets.txt"

# The files with the most test time, longest first (summed test times, 2-core dev machine, 2026-12-07).
# Under `--dist loadfile` a worker takes the next whole file when it is done with one; a long file taken
# last keeps one worker busy while the others have nothing left. They run first, then the rest in order.
LONGEST_FILES = (
    "test_pipeline.py", "test_reliability.py", "test_fp8.py", "test_document_masking.py",
    "test_zero_bubble.py", "test_fp8_cache.py", "test_zero.py", "test_checkpoint.py", "test_parity.py",
    "test_multinode.py", "test_train_samples.py",
)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    first = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: a file's own order kept


# Workers for `-n auto` (pyproject's addopts): the tests are CPU-bound and set one intra-op thread, so one
# worker per core this process may run on. More would only share the cores: a multi-rank test already
# forks up to 8 ranks. On a 2-core machine (2026-12-07, four of the heavier files), 4 workers took as
# long as 2: 339 s against 334 s.
MAX_WORKERS = 8


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown where it is not installed
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


def write_token_dataset(
    path: Path, train: np.ndarray, val: np.ndarray, *, vocab_size: int = 65536, eos_token_id: int = 0
) -> Path:
    """A hand-made prepared dataset (format 1, uint16) of the given token ids, no tokenizer needed."""
    path.mkdir(parents=True)
    train.astype(np.uint16).tofile(path / "train.bin")
    val.astype(np.uint16).tofile(path / "val.bin")
    meta = {
        "format_version": 1,
        "dtype": "uint16",
        "vocab_size": vocab_size,
        "eos_token_id": eos_token_id,
        "tokenizer": "gpt2",
        "num_tokens": {"train": len(train), "val": len(val)},
        "sources": [],
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="session")
def sonnets_dataset(tmp_path_factory) -> Path:
    """The sonnets fixture prepared with the GPT-2 tokenizer (10% validation)."""
    out = tmp_path_factory.mktemp("data") / "sonnets"
    prepare_dataset([SONNETS], out, val_fraction=0.1)
    return out


@pytest.fixture(scope="session")
def reference() -> Callable[[Config], dict]:
    """reference(config): `train_and_gather` of `config` in one process, the single-process run a layout
    is compared with. Each distinct config trains once per session."""
    runs: dict[str, dict] = {}

    def single_process(config: Config) -> dict:
        assert config.world_size == 1, f"a reference runs in one process, not {config.world_size}"
        key = repr(config)  # the dataclass repr spells out every field
        if key not in runs:
            runs[key] = run_ranks(1, train_and_gather, config)[0]
        return runs[key]

    return single_process


@pytest.fixture(scope="session")
def documents_dataset(tmp_path_factory):
    """The sonnets cut into documents of one to three lines (about 8 to 30 tokens): a 16-token sample
    spans one to three documents."""
    root = tmp_path_factory.mktemp("docs")
    text = SONNETS.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    docs, at, n = [], 0, 0
    while at < len(lines):
        size = 1 + n % 3
        docs.append("\n".join(lines[at : at + size]))
        at, n = at + size, n + 1
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = root / "dataset"
    prepare_dataset([src], out, val_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def whole_run(sonnets_dataset, tmp_path_factory) -> Callable[[tuple], tuple[dict, Path]]:
    """whole_run(layout): the uninterrupted 4-step run of a test_checkpoint layout (tp, pp, dp, v[, zero]),
    checkpoints at steps 2 and 4, and its checkpoint folder; trained once per module. The resume and
    reshard tests start from the same runs and only read their checkpoints."""
    runs: dict[tuple, tuple[dict, Path]] = {}

    def whole(layout: tuple) -> tuple[dict, Path]:
        if layout not in runs:
            run = tmp_path_factory.mktemp("whole")
            runs[layout] = train_merged(ckpt_config(sonnets_dataset, run, *layout)), run / "ckpt"
        return runs[layout]

    return whole
