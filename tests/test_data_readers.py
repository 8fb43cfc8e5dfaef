"""`threefold data prepare` on every corpus format: the same documents give the same token files, and bad
input is named and leaves an existing dataset untouched."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
import zstandard

from threefold.cli import main
from threefold.data.inspect import inspect_dataset
from threefold.data.prepare import prepare_dataset, prepare_main

DOCS = [
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.",
    "",  # empty documents are skipped by every reader alike
    "Rough winds do shake the darling buds of May,\r\nAnd summer's lease hath all too short a date.",
    "Ünïcödé — survives every format: 日本語, emoji 🙂.",
    "So long as men can breathe or eyes can see,\nSo long lives this, and this gives life to thee.",
] * 5


def _jsonl_bytes(docs: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def _write(kind: str, directory: Path, docs: list[str] = DOCS) -> Path:
    if kind == "jsonl":
        path = directory / "c.jsonl"
        path.write_bytes(_jsonl_bytes(docs))
    elif kind == "jsonl.gz":
        path = directory / "c.jsonl.gz"
        path.write_bytes(gzip.compress(_jsonl_bytes(docs)))
    elif kind == "jsonl.zst":
        path = directory / "c.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(docs)))
    elif kind == "parquet":
        path = directory / "c.parquet"
        # Small row groups, so the reader crosses batch boundaries.
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=3)
    elif kind == "arrow-file":
        path = directory / "c.arrow"
        table = pa.table({"text": docs})
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=4):
                writer.write_batch(batch)
    elif kind == "arrow-stream":
        path = directory / "c.arrow"
        table = pa.table({"text": docs})
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=4)
    elif kind == "hf":
        datasets = pytest.importorskip("datasets")
        path = directory / "hf"
        # Two shards, so their order (from state.json) matters.
        datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))}).save_to_disk(
            str(path), num_shards=2
        )
    else:
        raise AssertionError(kind)
    return path


def _files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("train.bin", "val.bin")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("ref")
    out = directory / "out"
    prepare_dataset([_write("jsonl", directory)], out, val_fraction=0.2)
    return _files(out)


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst", "parquet", "arrow-file", "arrow-stream", "hf"])
def test_every_format_gives_the_tokens_of_the_same_jsonl(kind, tmp_path, reference):
    source = _write(kind, tmp_path)
    meta = prepare_dataset([source], tmp_path / "out", val_fraction=0.2)
    assert _files(tmp_path / "out") == reference
    # Format 2 counts documents per split; the split may cut one document in two.
    assert sum(meta["num_documents"].values()) - sum(1 for d in DOCS if d) in (0, 1)


def test_a_directory_mixes_formats_in_name_order(tmp_path, reference):
    (tmp_path / "in").mkdir()
    half = len(DOCS) // 2
    _write("jsonl.gz", tmp_path / "in", DOCS[:half]).rename(tmp_path / "in" / "a.jsonl.gz")
    _write("parquet", tmp_path / "in", DOCS[half:]).rename(tmp_path / "in" / "b.parquet")
    prepare_dataset([tmp_path / "in"], tmp_path / "out", val_fraction=0.2)
    assert _files(tmp_path / "out") == reference


def _corrupt_gzip(d: Path) -> Path:
    path = d / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl_bytes(DOCS))[:-20])
    return path


def _corrupt_zst(d: Path) -> Path:
    path = d / "bad.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(64))
    return path


def _corrupt_parquet(d: Path) -> Path:
    path = d / "bad.parquet"
    path.write_bytes(b"PAR1" + os.urandom(100))
    return path


def _non_utf8_gz(d: Path) -> Path:
    path = d / "latin.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl_bytes(DOCS[:2]) + '{"text": "caf\xe9"}\n'.encode("latin-1")))
    return path


def _wrong_column(d: Path) -> Path:
    path = d / "cols.parquet"
    pq.write_table(pa.table({"body": DOCS}), path)
    return path


def _null_row(d: Path) -> Path:
    path = d / "nulls.parquet"
    pq.write_table(pa.table({"text": ["fine", None, "also fine"]}), path)
    return path


def _number_field(d: Path) -> Path:
    path = d / "num.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n{"text": 7}\n'))
    return path


def _huge_record(d: Path) -> Path:
    path = d / "huge.parquet"
    pq.write_table(pa.table({"text": ["short", "x" * 5000]}), path)
    return path


def _empty_file(d: Path) -> Path:
    path = d / "empty.jsonl.gz"
    path.write_bytes(gzip.compress(b""))
    return path


def _unreadable(d: Path) -> Path:
    path = d / "secret.parquet"
    pq.write_table(pa.table({"text": DOCS}), path)
    path.chmod(0)
    return path


def _escaping_hf(d: Path) -> Path:
    path = d / "hf"
    path.mkdir()
    (path / "dataset_info.json").write_text("{}")
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../outside.arrow"}]}))
    return path


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (_corrupt_gzip, {}, "bad.jsonl.gz' is corrupt or truncated"),
        (_corrupt_zst, {}, "bad.jsonl.zst' is corrupt or truncated"),
        (_corrupt_parquet, {}, "bad.parquet' is not a readable Parquet file"),
        (_non_utf8_gz, {}, "latin.jsonl.gz' line 3 is not valid UTF-8"),
        (_wrong_column, {}, "cols.parquet' has no column 'text' (columns: ['body'])"),
        (_null_row, {}, "nulls.parquet' row 1 has a null 'text'"),
        (_number_field, {}, "num.jsonl.zst' line 2 has no string field 'text'"),
        (_huge_record, {"max_record_bytes": 1000}, "huge.parquet' row 1 is 5,000 bytes"),
        (_empty_file, {}, "hold no documents"),
        (_unreadable, {}, "secret.parquet"),
        (_escaping_hf, {}, "names '../outside.arrow', which is not a file"),
    ],
)
def test_bad_input_is_named_and_the_old_dataset_survives(make, kwargs, message, tmp_path, reference):
    if make is _unreadable and os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    out = tmp_path / "out"
    prepare_dataset([_write("jsonl", tmp_path)], out, val_fraction=0.2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError) as info:
        prepare_dataset([make(tmp_path)], out, val_fraction=0.2, **kwargs)
    assert message in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []  # no temp left


def test_the_command_reports_a_bad_record_and_exits_1(tmp_path, capsys):
    rc = prepare_main([str(_null_row(tmp_path)), "--out", str(tmp_path / "out")])
    assert rc == 1
    assert "nulls.parquet' row 1 has a null 'text'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_command_takes_max_record_bytes(tmp_path, capsys):
    source = _huge_record(tmp_path)
    assert prepare_main([str(source), "--out", str(tmp_path / "a"), "--max-record-bytes", "100"]) == 1
    assert "over --max-record-bytes (100)" in capsys.readouterr().err
    assert prepare_main([str(source), "--out", str(tmp_path / "b"), "--max-record-bytes", "10000"]) == 0


def test_inspect_counts_documents_and_decodes_one(tmp_path, capsys):
    docs = ["one two three", "four", "five six seven eight nine ten", "eleven"] * 6
    meta = prepare_dataset([_write("parquet", tmp_path, docs)], tmp_path / "ds", val_fraction=0.25)
    report = inspect_dataset(tmp_path / "ds", sample=2, num_tokens=3)
    splits = report["splits"]
    assert {s: splits[s]["tokens"] for s in ("train", "val")} == meta["num_tokens"]
    assert {s: splits[s]["documents"] for s in ("train", "val")} == meta["num_documents"]
    assert sum(meta["num_documents"].values()) - len(docs) in (0, 1)  # the split may cut one document in two
    assert sum(b["documents"] for b in splits["train"]["histogram"]) == splits["train"]["documents"]
    assert report["sample"]["text"] == "five six seven"
    assert len(report["sample"]["ids"]) == 3

    # The command line: --json prints the same report.
    assert main(["data", "inspect", str(tmp_path / "ds"), "--sample", "2", "--tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == report
    assert main(["data", "inspect", str(tmp_path / "ds"), "--sample", "999"]) == 1
    assert "--sample 999 is outside the" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 1
    assert "no meta.json" in capsys.readouterr().err


def test_special_tokens_in_the_text_do_not_end_a_document(tmp_path):
    docs = ["the string <|endoftext|> is how GPT-2 ends a document", "second"] * 3
    meta = prepare_dataset([_write("jsonl", tmp_path, docs)], tmp_path / "ds", val_fraction=0.3)
    tokens = np.concatenate(
        [np.fromfile(tmp_path / "ds" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")]
    )
    assert int((tokens == meta["eos_token_id"]).sum()) == len(docs)
    assert tokens[-1] == meta["eos_token_id"]


def test_checksums_are_recorded_and_verify_finds_a_changed_byte(tmp_path, capsys):
    meta = prepare_dataset([_write("jsonl", tmp_path)], tmp_path / "ds", val_fraction=0.2)
    for name in ("train.bin", "val.bin"):
        expected = "sha256:" + hashlib.sha256((tmp_path / "ds" / name).read_bytes()).hexdigest()
        assert meta["checksums"][name] == expected
    assert main(["data", "inspect", str(tmp_path / "ds"), "--verify"]) == 0
    assert "checksums verified" in capsys.readouterr().out
    data = bytearray((tmp_path / "ds" / "val.bin").read_bytes())
    data[3] ^= 1
    (tmp_path / "ds" / "val.bin").write_bytes(bytes(data))
    assert main(["data", "inspect", str(tmp_path / "ds"), "--verify"]) == 1
    assert "checksums MISMATCH: val.bin" in capsys.readouterr().out


def test_a_closed_pipe_is_not_a_traceback(tmp_path):
    """`threefold data inspect DIR | head -1`: the reader has gone before the report is written. The
    command ends quietly with status 141 (a shell's SIGPIPE status) instead of a BrokenPipeError."""
    prepare_dataset([_write("jsonl", tmp_path)], tmp_path / "ds", val_fraction=0.2)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "threefold", "data", "inspect", str(tmp_path / "ds")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.close()  # long before the interpreter has started, let alone written the report
    _, err = proc.communicate(timeout=60)
    assert "BrokenPipeError" not in err.decode() and "Traceback" not in err.decode()
    assert proc.returncode == 141
