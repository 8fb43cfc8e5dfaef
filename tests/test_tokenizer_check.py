"""A dataset prepared with one tokenizer and a checkpoint that carries another (an `import-hf` checkpoint
keeps its tokenizer.json): training refuses to start, naming both, even when the vocabulary sizes fit. The
same tokenizer, given as the built-in GPT-2 or as the Hugging Face tokenizer.json of GPT-2, is no mismatch."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from threefold.cli import main
from threefold.config import build_config
from threefold.data.prepare import prepare_dataset
from threefold.data.tokenizer import load_tokenizer, vocabulary_difference
from threefold.reliability.runguard import check_tokenizer

transformers = pytest.importorskip("transformers")

TEXT = "shall i compare thee to a summer's day thou art more lovely and more temperate " * 40


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """A tiny Llama with GPT-2's vocabulary, saved with GPT-2's tokenizer.json and imported."""
    root = tmp_path_factory.mktemp("tokcheck")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(root / "hf")
    load_tokenizer().save(str(root / "hf" / "tokenizer.json"))
    assert main(["import-hf", str(root / "hf"), str(root / "ckpt")]) == 0
    return root / "ckpt"


def _word_tokenizer(path: Path) -> str:
    words = ["<|endoftext|>", *sorted(set(TEXT.split()))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return str(path)


def _datasets(root: Path) -> tuple[Path, Path]:
    (root / "text.txt").write_text(TEXT)
    gpt2, words = root / "gpt2", root / "words"
    prepare_dataset([root / "text.txt"], gpt2, val_fraction=0.2)
    prepare_dataset([root / "text.txt"], words, val_fraction=0.2, tokenizer=_word_tokenizer(root / "w.json"))
    return gpt2, words


def test_vocabulary_difference_names_a_token(tmp_path: Path) -> None:
    load_tokenizer().save(str(tmp_path / "gpt2.json"))
    assert vocabulary_difference("gpt2", str(tmp_path / "gpt2.json")) is None
    difference = vocabulary_difference("gpt2", _word_tokenizer(tmp_path / "w.json"))
    assert difference is not None and "50,257 and 15 entries" in difference
    assert "'!': 0 and absent" in difference
    with pytest.raises(ValueError, match="does not exist"):
        vocabulary_difference("gpt2", str(tmp_path / "missing.json"))


def test_check_tokenizer_against_the_checkpoint(imported: Path, tmp_path: Path) -> None:
    gpt2, words = _datasets(tmp_path)

    def config(data: Path, load: Path | None) -> object:
        checkpoint = {"load": str(load), "load_mode": "weights"} if load else {}
        return build_config({"data": {"path": str(data)}, "checkpoint": checkpoint}, check_paths=False)

    check_tokenizer(config(gpt2, imported))  # the same vocabulary: no error
    check_tokenizer(config(words, None))  # nothing loaded: nothing to compare
    bare = tmp_path / "bare"  # a checkpoint without a tokenizer: nothing to compare
    bare.mkdir()
    (bare / "manifest.json").write_text("{}")
    check_tokenizer(config(words, bare))
    with pytest.raises(ValueError) as info:
        check_tokenizer(config(words, imported))
    message = str(info.value)
    assert str(words) in message and str(imported / "tokenizer.json") in message
    assert "their vocabularies differ" in message and f"--tokenizer {str(imported)!r}" in message


def test_training_refuses_the_mismatch_before_it_starts(imported: Path, tmp_path: Path, capfd) -> None:
    gpt2, words = _datasets(tmp_path)
    model = (imported / "model.toml").read_text()
    run = f"""{model}
[data]
seq_len = 16
[training]
device = "cpu"
dtype = "float32"
max_steps = 1
global_batch_size = 2
micro_batch_size = 2
eval_interval = 0
[checkpoint]
load = "{imported}"
load_mode = "weights"
[logging]
progress = false
tensorboard = false
plot = false
"""
    (tmp_path / "run.toml").write_text(run)
    args = ["train", str(tmp_path / "run.toml")]
    assert main([*args, f"--data.path={words}", f"--logging.out_dir={tmp_path / 'a'}"]) != 0
    assert "carries its own tokenizer" in capfd.readouterr().err
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    assert main([*args, f"--data.path={gpt2}", f"--logging.out_dir={tmp_path / 'b'}"]) == 0
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in records)
