"""bench/torchtitan_llama1b.py's assets: the text and tokenizer TorchTitan reads in issue 18's side-by-side
runs must be the same documents, through the same tokenizer, as the prepared dataset threefold reads."""

import importlib.util
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from threefold.data.format import read_meta
from threefold.data.prepare import prepare_dataset

SPEC = importlib.util.spec_from_file_location(
    "torchtitan_llama1b", Path(__file__).parents[1] / "bench/torchtitan_llama1b.py"
)
assert SPEC is not None and SPEC.loader is not None
tool = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(tool)


def test_the_assets_hold_the_datasets_documents_through_its_tokenizer(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    docs = [
        "def f(x):\n    return x + 1\n",
        "Shall I compare thee to a summer's day?",
        "  spaced   text\n\n",
    ] * 5
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    prepare_dataset([corpus], tmp_path / "ds", val_fraction=0.2)
    meta = read_meta(tmp_path / "ds")

    tool.write_assets(tmp_path / "assets", tmp_path / "ds", tokens=10**9)

    tokenizer = Tokenizer.from_file(str(tmp_path / "assets/tokenizer/tokenizer.json"))
    config = json.loads((tmp_path / "assets/tokenizer/tokenizer_config.json").read_text())
    assert tokenizer.token_to_id(config["eos_token"]) == meta["eos_token_id"]
    lines = (tmp_path / "assets/text/data.json").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    ids = np.fromfile(tmp_path / "ds/train.bin", dtype=meta["dtype"])
    documents = np.split(ids, np.flatnonzero(ids == meta["eos_token_id"]) + 1)[:-1]
    assert len(texts) == len(documents) == meta["num_documents"]["train"]
    assert set(texts) <= set(docs)
    for text, document in zip(texts, documents, strict=True):
        assert tokenizer.encode(text).ids == document[:-1].tolist()  # the EOS closes each document


def test_the_token_budget_keeps_only_the_whole_documents_within_it(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(30)))
    prepare_dataset([corpus], tmp_path / "ds", val_fraction=0.2)
    tool.write_assets(tmp_path / "assets", tmp_path / "ds", tokens=100)
    lines = (tmp_path / "assets/text/data.json").read_text(encoding="utf-8").splitlines()
    tokenizer = Tokenizer.from_file(str(tmp_path / "assets/tokenizer/tokenizer.json"))
    lengths = [len(tokenizer.encode(json.loads(line)["text"]).ids) + 1 for line in lines]  # + its EOS
    assert lines and sum(lengths) <= 100 < sum(lengths) + lengths[0]
