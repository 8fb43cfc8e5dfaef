"""Tests for `data prepare`'s readers, worker processes, document indexes, checksums, --append, and
`data inspect`, on real files of every format and the real GPT-2 tokenizer."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import zstandard

import threefold.data.encode as encode
from threefold.data.dataset import INDEX_DTYPE, TokenDataset, check_dataset, read_meta
from threefold.data.inspect import inspect_dataset, inspect_main
from threefold.data.prepare import prepare_dataset, prepare_main
from threefold.data.tokenizer import load_tokenizer

SONNETS = Path(__file__).parent / "data" / "sonnets.txt"
FILES = ("train.bin", "train.idx", "val.bin", "val.idx")
EOS = 50256


def _documents() -> list[str]:
    """Sonnet lines as documents, plus a few with non-ASCII text and Windows line ends."""
    lines = [line for line in SONNETS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:40] + ["Café crème — naïve «quotes» 日本語", "two\r\nlines\r\n", "  leading spaces"]


def _files(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in FILES}


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text(
        "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8"
    )
    return path


def _write_parquet(path: Path, docs: list, field: str = "text") -> Path:
    # Small row groups, so the reader has to stream several batches.
    pq.write_table(pa.table({field: docs, "n": list(range(len(docs)))}), path, row_group_size=7)
    return path


def _write_arrow(path: Path, docs: list[str], *, stream: bool) -> Path:
    table = pa.table({"text": docs})
    opener = ipc.new_stream if stream else ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=5):
            writer.write_batch(batch)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documents prepared from JSON lines: what every other format must reproduce byte for byte."""
    root = tmp_path_factory.mktemp("reference")
    prepare_dataset([_write_jsonl(root / "docs.jsonl", _documents())], root / "ds", workers=1)
    return root / "ds"


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def _make_txt_dir(d: Path, docs: list[str]) -> Path:
    (d / "txt").mkdir()
    for i, doc in enumerate(docs):  # one document per file, named so sorted order is document order
        (d / "txt" / f"{i:03d}.txt").write_bytes(doc.encode("utf-8"))
    return d / "txt"


def _make_gz(d: Path, docs: list[str]) -> Path:
    data = _write_jsonl(d / "x.jsonl", docs).read_bytes()
    (d / "docs.jsonl.gz").write_bytes(gzip.compress(data))
    return d / "docs.jsonl.gz"


def _make_zst(d: Path, docs: list[str]) -> Path:
    data = _write_jsonl(d / "x.jsonl", docs).read_bytes()
    (d / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    return d / "docs.jsonl.zst"


def _zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def _make_zst_frames(d: Path, docs: list[str]) -> Path:
    # Two frames back to back, as `cat a.zst b.zst` makes: both are read.
    (d / "frames.jsonl.zst").write_bytes(
        _zst(_write_jsonl(d / "x", docs[:20]).read_bytes())
        + _zst(_write_jsonl(d / "y", docs[20:]).read_bytes())
    )
    return d / "frames.jsonl.zst"


def _make_hf(d: Path, docs: list[str]) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))}).save_to_disk(str(d / "hf"))
    return d / "hf"


def _make_mixed_dir(d: Path, docs: list[str]) -> Path:
    # A directory of several formats, read in sorted path order: a/ then b.parquet then c.jsonl.zst.
    (d / "mixed" / "a").mkdir(parents=True)
    _write_jsonl(d / "mixed" / "a" / "part.jsonl", docs[:10])
    _write_parquet(d / "mixed" / "b.parquet", docs[10:30])
    (d / "mixed" / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(_write_jsonl(d / "y.jsonl", docs[30:]).read_bytes())
    )
    (d / "mixed" / "notes.md").write_text("not an input")
    return d / "mixed"


@pytest.mark.parametrize(
    "make",
    [
        _make_txt_dir,
        _make_gz,
        _make_zst,
        _make_zst_frames,
        lambda d, docs: _write_parquet(d / "docs.parquet", docs),
        lambda d, docs: _write_arrow(d / "file.arrow", docs, stream=False),
        lambda d, docs: _write_arrow(d / "stream.arrow", docs, stream=True),
        _make_hf,
        _make_mixed_dir,
    ],
    ids=[
        "txt",
        "jsonl.gz",
        "jsonl.zst",
        "jsonl.zst-frames",
        "parquet",
        "arrow-file",
        "arrow-stream",
        "hf-dataset",
        "mixed-dir",
    ],
)
def test_every_format_gives_the_same_tokens(tmp_path: Path, reference: Path, make) -> None:
    meta = prepare_dataset([make(tmp_path, _documents())], tmp_path / "ds", workers=1)
    assert _files(tmp_path / "ds") == _files(reference)
    assert meta["num_documents"] == read_meta(reference)["num_documents"]


def test_reference_tokens_are_the_documents_encoded(reference: Path) -> None:
    tok = load_tokenizer()
    expected: list[int] = []
    for doc in _documents():
        expected += tok.encode(doc, add_special_tokens=False).ids + [EOS]
    meta = read_meta(reference)
    stream = np.concatenate(
        [np.fromfile(reference / f"{s}.bin", dtype=meta["dtype"]) for s in ("train", "val")]
    )
    assert stream.tolist() == expected
    assert meta["format_version"] == 2 and meta["num_documents"]["train"] + meta["num_documents"]["val"] == 43


# ---------------------------------------------------------------------------------------------
# Workers, index, split, checksums
# ---------------------------------------------------------------------------------------------


def test_output_does_not_depend_on_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode, "BATCH_DOCS", 3)  # many batches, so out-of-order results would show
    corpus = _write_jsonl(tmp_path / "docs.jsonl", _documents() * 3)
    prepare_dataset([corpus], tmp_path / "one", workers=1)
    prepare_dataset([corpus], tmp_path / "two", workers=2)
    assert _snapshot(tmp_path / "one") == _snapshot(tmp_path / "two")


@pytest.mark.parametrize("val_fraction", [0.05, 0.3, 0.5, 0.9])
def test_index_split_and_checksums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, val_fraction: float
) -> None:
    # Batches of 2 documents: the split lands inside a batch and many hash states are pruned on the way.
    monkeypatch.setattr(encode, "BATCH_DOCS", 2)
    docs = _documents()
    meta = prepare_dataset(
        [_write_jsonl(tmp_path / "d.jsonl", docs)], tmp_path / "ds", val_fraction=val_fraction
    )
    ds = tmp_path / "ds"
    lengths = []
    for split in ("train", "val"):
        tokens = np.fromfile(ds / f"{split}.bin", dtype=meta["dtype"])
        index = np.fromfile(ds / f"{split}.idx", dtype=INDEX_DTYPE)
        # Every document ends in EOS, and only there: the index's ends are exactly the EOS positions.
        assert index[0] == 0 and index[-1] == len(tokens) == meta["num_tokens"][split]
        assert (np.flatnonzero(tokens == EOS) + 1).tolist() == index[1:].tolist()
        assert len(index) - 1 == meta["num_documents"][split] >= 1
        lengths += np.diff(index.astype(np.int64)).tolist()
    assert len(lengths) == len(docs)
    # The split is the document boundary nearest val_fraction of the tokens.
    total, train = sum(lengths), meta["num_tokens"]["train"]
    boundaries = np.cumsum(lengths)[:-1]
    assert train in boundaries
    assert abs(train - (1 - val_fraction) * total) == min(
        abs(b - (1 - val_fraction) * total) for b in boundaries
    )
    for name in FILES:
        assert meta["checksums"][name] == "sha256:" + hashlib.sha256((ds / name).read_bytes()).hexdigest()
    assert check_dataset(ds, model_vocab_size=50257) == meta


def test_one_document_is_split_by_tokens(tmp_path: Path) -> None:
    meta = prepare_dataset([SONNETS], tmp_path / "ds", val_fraction=0.1)
    ds = tmp_path / "ds"
    assert meta["num_documents"] == {"train": 1, "val": 1}
    for split in ("train", "val"):
        index = np.fromfile(ds / f"{split}.idx", dtype=INDEX_DTYPE).tolist()
        assert index == [0, meta["num_tokens"][split]]
    for name in FILES:
        assert meta["checksums"][name] == "sha256:" + hashlib.sha256((ds / name).read_bytes()).hexdigest()


def test_check_dataset_catches_a_bad_index(tmp_path: Path) -> None:
    prepare_dataset([_write_jsonl(tmp_path / "d.jsonl", _documents())], tmp_path / "ds")
    idx = tmp_path / "ds" / "train.idx"
    index = np.fromfile(idx, dtype=INDEX_DTYPE)
    index[-1] += 1
    index.tofile(idx)
    with pytest.raises(ValueError, match="train.idx' runs from offset 0 to"):
        check_dataset(tmp_path / "ds", model_vocab_size=50257, scan=False)
    index[:-1].tofile(idx)
    with pytest.raises(ValueError, match="train.idx' holds"):
        check_dataset(tmp_path / "ds", model_vocab_size=50257, scan=False)


def test_training_still_refuses_a_vocabulary_larger_than_the_model(reference: Path) -> None:
    with pytest.raises(ValueError, match="model.vocab_size is 1000"):
        check_dataset(reference, model_vocab_size=1000)


# ---------------------------------------------------------------------------------------------
# Append
# ---------------------------------------------------------------------------------------------


def test_append_equals_preparing_the_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode, "BATCH_DOCS", 4)
    docs = _documents()
    first, second = (
        _write_jsonl(tmp_path / "a.jsonl", docs[:25]),
        _write_jsonl(tmp_path / "b.jsonl", docs[25:]),
    )
    prepare_dataset([first], tmp_path / "a", val_fraction=0.2)
    prepare_dataset([second], tmp_path / "b", val_fraction=0.2)
    prepare_dataset([first], tmp_path / "ab", val_fraction=0.2)
    meta = prepare_dataset([second], tmp_path / "ab", val_fraction=0.2, append=True, workers=2)

    a, b = read_meta(tmp_path / "a"), read_meta(tmp_path / "b")
    for split in ("train", "val"):
        # Tokens: the existing split, then the new documents' part for that split.
        name = f"{split}.bin"
        assert (tmp_path / "ab" / name).read_bytes() == (tmp_path / "a" / name).read_bytes() + (
            tmp_path / "b" / name
        ).read_bytes()
        # Index: the second part's offsets continue where the first part's tokens end.
        index = np.fromfile(tmp_path / "ab" / f"{split}.idx", dtype=INDEX_DTYPE).tolist()
        ia = np.fromfile(tmp_path / "a" / f"{split}.idx", dtype=INDEX_DTYPE).tolist()
        ib = np.fromfile(tmp_path / "b" / f"{split}.idx", dtype=INDEX_DTYPE).tolist()
        assert index == ia + [a["num_tokens"][split] + x for x in ib[1:]]
        assert meta["num_documents"][split] == a["num_documents"][split] + b["num_documents"][split]
        assert meta["num_tokens"][split] == a["num_tokens"][split] + b["num_tokens"][split]
    assert meta["sources"] == [str(first.resolve()), str(second.resolve())]
    for name in FILES:
        digest = hashlib.sha256((tmp_path / "ab" / name).read_bytes()).hexdigest()
        assert meta["checksums"][name] == "sha256:" + digest
    assert check_dataset(tmp_path / "ab", model_vocab_size=50257) == meta == read_meta(tmp_path / "ab")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _word_tokenizer(tmp_path: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<|endoftext|>": 1, "a": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "words.json"))
    return str(tmp_path / "words.json")


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing half-written, the existing dataset untouched
# ---------------------------------------------------------------------------------------------


def _put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _bad_inputs(d: Path) -> dict:
    """name -> (make the input, extra prepare_dataset arguments, text the error must contain)."""
    big = "word " * 100
    return {
        "empty file": (lambda: _put(d / "empty.jsonl", b""), {}, "empty.jsonl"),
        "empty text": (lambda: _write_jsonl(d / "blank.jsonl", ["", ""]), {}, "hold no documents"),
        "no inputs in dir": (
            lambda: _put(d / "nothing" / "x.md", b"x").parent,
            {},
            "'" + str(d / "nothing") + "' holds no readable inputs",
        ),
        "missing field": (
            lambda: _write_jsonl(d / "f.jsonl", ["a"], field="body"),
            {},
            "f.jsonl' line 1 has no string field 'text' (fields: ['body', 'id'])",
        ),
        "missing column": (
            lambda: _write_parquet(d / "c.parquet", ["a"], field="body"),
            {},
            "c.parquet' has no column 'text' (columns: ['body', 'n'])",
        ),
        "null row": (lambda: _write_parquet(d / "n.parquet", ["a", None]), {}, "n.parquet' row 1 has a null"),
        "non-utf8 jsonl": (
            lambda: _put(d / "l.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
            {},
            "l.jsonl' line 2 is not valid UTF-8 (byte offset 28",
        ),
        "non-utf8 txt": (
            lambda: _put(d / "l.txt", b"good start caf\xe9"),
            {},
            "l.txt' is not valid UTF-8: byte offset 14",
        ),
        "record too large": (
            lambda: _write_jsonl(d / "big.jsonl", ["small", big]),
            {"max_record_bytes": 200},
            "big.jsonl' line 2 is 522 bytes, over --max-record-bytes (200)",
        ),
        "row too large": (
            lambda: _write_parquet(d / "big.parquet", ["small", "x", big]),
            {"max_record_bytes": 200},
            "big.parquet' row 2 is 500 bytes",
        ),
        "truncated gzip": (
            lambda: _put(
                d / "t.jsonl.gz", gzip.compress(_write_jsonl(d / "t", _documents()).read_bytes())[:-300]
            ),
            {},
            "t.jsonl.gz' is corrupt or truncated",
        ),
        "garbage zst": (
            lambda: _put(d / "g.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"garbage" * 20),
            {},
            "g.jsonl.zst' is corrupt or truncated",
        ),
        "truncated zst": (
            lambda: _put(d / "t.jsonl.zst", _zst(_write_jsonl(d / "t", _documents()).read_bytes())[:-20]),
            {},
            "t.jsonl.zst' is corrupt or truncated",
        ),
        "garbage parquet": (
            lambda: _put(d / "g.parquet", b"PAR1 this is not parquet"),
            {},
            "g.parquet' is not a readable Parquet file",
        ),
        "garbage arrow": (
            lambda: _put(d / "g.arrow", b"ARROW1\x00\x00 junk junk"),
            {},
            "g.arrow' is not a readable Arrow file",
        ),
        "bad json": (
            lambda: _put(d / "j.jsonl", b'{"text": "a"}\n{"text": \n'),
            {},
            "j.jsonl' line 2 is not valid JSON",
        ),
        "append other vocab": (
            lambda: _write_jsonl(d / "ok.jsonl", ["a a"]),
            {"append": True, "tokenizer": "WORDS"},
            "their vocabularies differ",
        ),
        "bad workers": (lambda: _write_jsonl(d / "ok.jsonl", ["a"]), {"workers": 0}, "workers (0)"),
    }


CASES = sorted(_bad_inputs(Path("/")))


@pytest.mark.parametrize("append", [False, True], ids=["replace", "append"])
@pytest.mark.parametrize("case", CASES)
def test_bad_input_leaves_the_dataset_untouched(tmp_path: Path, case: str, append: bool) -> None:
    out = tmp_path / "ds"
    prepare_dataset([_write_jsonl(tmp_path / "good.jsonl", _documents()[:5])], out, workers=1)
    before = _snapshot(out)
    make, kwargs, needle = _bad_inputs(tmp_path)[case]
    if kwargs.get("tokenizer") == "WORDS":
        if not append:
            pytest.skip("only an append compares tokenizers")
        kwargs = {**kwargs, "tokenizer": _word_tokenizer(tmp_path)}
    with pytest.raises(ValueError) as info:
        prepare_dataset([make()], out, **({"append": append, "workers": 1} | kwargs))
    assert needle in str(info.value)
    assert _snapshot(out) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_append_error_names_both_tokenizers(tmp_path: Path) -> None:
    words = _word_tokenizer(tmp_path)
    prepare_dataset([_write_jsonl(tmp_path / "a.jsonl", ["a a", "a"])], tmp_path / "ds", tokenizer=words)
    with pytest.raises(ValueError) as info:
        prepare_dataset(
            [_write_jsonl(tmp_path / "b.jsonl", ["x"])], tmp_path / "ds", tokenizer="gpt2", append=True
        )
    assert "'gpt2'" in str(info.value) and repr(str(Path(words).resolve())) in str(info.value)
    # Without --tokenizer, an append takes the dataset's own.
    meta = prepare_dataset([_write_jsonl(tmp_path / "c.jsonl", ["a", "a a a"])], tmp_path / "ds", append=True)
    assert meta["tokenizer"] == str(Path(words).resolve()) and meta["num_documents"] == {"train": 2, "val": 2}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "secret.jsonl", ["a"])
    path.chmod(0)
    with pytest.raises(ValueError, match="cannot read input .*secret.jsonl.*permission denied"):
        prepare_dataset([path], tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_missing_package_names_the_pip_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _make_zst(tmp_path, ["a"])
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` raise ImportError
    with pytest.raises(ValueError, match="pip install zstandard"):
        prepare_dataset([path], tmp_path / "ds")


def test_hf_dataset_dict_asks_for_a_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="DatasetDict with splits \\['train'\\]"):
        prepare_dataset([tmp_path / "dd"], tmp_path / "ds")
    meta = prepare_dataset([tmp_path / "dd" / "train"], tmp_path / "ds")
    assert meta["num_documents"] == {"train": 1, "val": 1}


def test_append_refuses_a_format_1_dataset(tmp_path: Path) -> None:
    old = _format_1_dataset(tmp_path / "old")
    with pytest.raises(ValueError, match="format-1 dataset"):
        prepare_dataset([_write_jsonl(tmp_path / "a.jsonl", ["a", "b"])], old, append=True)


def test_append_refuses_a_damaged_dataset(tmp_path: Path) -> None:
    prepare_dataset([_write_jsonl(tmp_path / "a.jsonl", _documents()[:6])], tmp_path / "ds")
    data = bytearray((tmp_path / "ds" / "train.bin").read_bytes())
    data[3] ^= 1
    (tmp_path / "ds" / "train.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        prepare_dataset([_write_jsonl(tmp_path / "b.jsonl", ["x", "y"])], tmp_path / "ds", append=True)


# ---------------------------------------------------------------------------------------------
# Format 1, inspect, the command line
# ---------------------------------------------------------------------------------------------


def _format_1_dataset(path: Path) -> Path:
    path.mkdir()
    tokens = np.array([5, 6, EOS, 7, 8, 9, EOS, 10, EOS], dtype=np.uint16)
    tokens[:7].tofile(path / "train.bin")
    tokens[7:].tofile(path / "val.bin")
    meta = {
        "format_version": 1, "dtype": "uint16", "vocab_size": 50257, "eos_token_id": EOS, "tokenizer": "gpt2",
        "num_tokens": {"train": 7, "val": 2}, "num_documents": 3, "sources": [],
    }  # fmt: skip
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_format_1_dataset_still_loads(tmp_path: Path) -> None:
    path = _format_1_dataset(tmp_path / "old")
    assert check_dataset(path, model_vocab_size=50257)["format_version"] == 1
    inputs, targets = TokenDataset(path, "train", seq_len=3)[1]
    assert inputs.tolist() == [7, 8, 9] and targets.tolist() == [8, 9, EOS]
    report = inspect_dataset(path)
    assert report["splits"]["train"]["documents"] == 2 and report["checksums"] == "none (format 1)"


def test_inspect_json(tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta = read_meta(reference)
    assert inspect_main([str(reference), "--json", "--sample", "2", "--tokens", "5", "--verify"]) == 0
    report = json.loads(capsys.readouterr().out)
    for split in ("train", "val"):
        facts = report["splits"][split]
        assert facts["tokens"] == meta["num_tokens"][split]
        assert facts["documents"] == meta["num_documents"][split]
        assert sum(b["documents"] for b in facts["histogram"]) == facts["documents"]
    assert report["checksums"] == "verified" and report["tokenizer"] == "gpt2"
    tok = load_tokenizer()
    assert report["sample"]["ids"] == (tok.encode(_documents()[2]).ids + [EOS])[:5]
    assert report["sample"]["text"] == tok.decode(report["sample"]["ids"], skip_special_tokens=False)

    assert inspect_main([str(reference)]) == 0
    text = capsys.readouterr().out
    assert "checksums recorded" in text and f"{meta['num_tokens']['train']:,} tokens" in text
    assert inspect_main([str(reference), "--sample", "9999"]) == 1
    assert "--sample 9999" in capsys.readouterr().err


def test_inspect_verify_finds_a_damaged_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prepare_dataset([_write_jsonl(tmp_path / "a.jsonl", _documents()[:6])], tmp_path / "ds")
    data = bytearray((tmp_path / "ds" / "val.bin").read_bytes())
    data[0] ^= 1
    (tmp_path / "ds" / "val.bin").write_bytes(bytes(data))
    assert inspect_main([str(tmp_path / "ds"), "--verify"]) == 1
    assert "MISMATCH: val.bin" in capsys.readouterr().out


def test_prepare_main_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _write_parquet(tmp_path / "c.parquet", _documents(), field="body")
    out = str(tmp_path / "ds")
    assert prepare_main([str(corpus), "--out", out, "--text-field", "body", "--workers", "2"]) == 0
    captured = capsys.readouterr()
    meta = read_meta(out)
    assert f"{meta['num_documents']['train']:,} + {meta['num_documents']['val']:,} documents" in captured.out
    # stderr is no terminal here: no carriage-return redraws, one summary line.
    assert "\r" not in captured.err and captured.err.startswith("tokenized 43 documents")
    assert prepare_main([str(corpus), "--out", out, "--text-field", "body", "--append", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""
    assert read_meta(out)["num_documents"]["train"] == 2 * meta["num_documents"]["train"]
    assert prepare_main([str(corpus), "--out", out, "--max-record-bytes", "10", "--text-field", "body"]) == 1
    assert "c.parquet' row 0 is" in capsys.readouterr().err


def test_length_stats_buckets_across_chunks() -> None:
    from threefold.data.inspect import length_stats

    stats = length_stats([np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([4, 9])])
    assert (
        stats["documents"] == 5 and stats["max_document_tokens"] == 9 and stats["mean_document_tokens"] == 3.8
    )
    assert stats["histogram"] == [
        {"min": 1, "max": 2, "documents": 1},
        {"min": 2, "max": 4, "documents": 2},
        {"min": 4, "max": 8, "documents": 1},
        {"min": 8, "max": 16, "documents": 1},
    ]
