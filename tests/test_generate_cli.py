"""`threefold generate` and `threefold eval` from the command line: an imported Hugging Face model keeps
its tokenizer, continues a prompt with transformers' greedy tokens (one process and tp=2), is scored with
transformers' loss, and its tokenizer goes back out on export; bad input is refused before any worker
starts."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from distributed import run_ranks

from threefold.cli import main
from threefold.data.dataset import TokenDataset
from threefold.data.tokenizer import load_tokenizer
from threefold.infer.text import load_codec

transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = (
    "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Bot:{% endif %}"
)
PROMPT = "Shall I compare thee to a summer's day?"


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, Path, object]:
    """(HF directory with a tokenizer, its threefold import, the transformers model)."""
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(root / "hf")
    load_tokenizer().save(str(root / "hf" / "tokenizer.json"))
    settings = {"eos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps(settings))
    assert main(["import-hf", str(root / "hf"), str(root / "ckpt")]) == 0
    return root / "hf", root / "ckpt", model


def _greedy(model, ids: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_generate_uses_the_checkpoints_tokenizer_under_any_layout(imported, capfd):
    hf_dir, ckpt, model = imported
    assert (ckpt / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    ids = load_tokenizer(str(hf_dir / "tokenizer.json")).encode(PROMPT).ids
    expected = _greedy(model, ids, 6)
    capfd.readouterr()
    # One process is proven equal to transformers in test_generate.py; here the launched tp=2 workers.
    args = [
        "generate",
        str(ckpt),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "6",
        "--json",
        "--parallel.tp_size=2",
    ]
    assert main(args) == 0
    (record,) = _json_lines(capfd.readouterr().out)
    assert record["tokens"] == expected
    assert record["prompt"] == PROMPT


def test_chat_prompts_follow_the_checkpoints_template(imported):
    hf_dir, ckpt, _ = imported
    codec = load_codec(ckpt, None, {})
    assert codec.chat_template == CHAT_TEMPLATE
    assert codec.eos_id() == 50256
    expected = load_tokenizer(str(hf_dir / "tokenizer.json")).encode(f"User: {PROMPT}\nBot:").ids
    assert codec.encode(PROMPT, chat=True) == expected
    assert codec.encode(PROMPT) != expected


def test_export_writes_the_tokenizer_back(imported, tmp_path):
    hf_dir, ckpt, _ = imported
    assert main(["export-hf", str(ckpt), str(tmp_path / "back")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (hf_dir / name).read_bytes()


def _eval(rank: int, world: int, ckpt: Path, data: Path, seq_len: int, batches: int):
    from threefold.commands.infer import checkpoint_config
    from threefold.infer.evaluate import evaluate
    from threefold.infer.load import build_stage, load_checkpoint_weights
    from threefold.parallel.mesh import build_mesh

    config = checkpoint_config(ckpt, [])
    mesh = build_mesh(
        1, 2, 2
    )  # dp 2 x pp 2: the micro-batches split over replicas, stages pass hidden states
    model = build_stage(config.model, mesh)
    load_checkpoint_weights(model, ckpt)
    return evaluate(model, TokenDataset(data, "val", seq_len), mesh, micro_batch_size=2, num_batches=batches)


def test_eval_gives_transformers_loss(imported, tmp_path):
    hf_dir, ckpt, model = imported
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(60)))
    # `data prepare` takes the checkpoint directory as its tokenizer.
    assert (
        main(
            [
                "data",
                "prepare",
                str(text),
                "--out",
                str(tmp_path / "data"),
                "--tokenizer",
                str(ckpt),
                "--val-fraction",
                "0.5",
            ]
        )
        == 0
    )
    seq_len, batches = 16, 3
    dataset = TokenDataset(tmp_path / "data", "val", seq_len)
    count = min(dataset.num_samples, batches * 2)
    assert count > 4, "the split must fill more than the micro-batches of one replica"
    x, y = dataset.get_batch(torch.arange(count).numpy())
    with torch.no_grad():
        expected = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item()
    results = run_ranks(4, _eval, ckpt, tmp_path / "data", seq_len, batches)
    for result in results:
        assert result.num_windows == count
        assert result.loss == pytest.approx(expected, rel=1e-5)
        assert result.perplexity == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)


def test_eval_refuses_bad_input(imported, tmp_path, capsys):
    _, ckpt, _ = imported
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "none")]) == 2
    assert "is not a prepared dataset" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--data", str(tmp_path), "--seq-len", "65"]) == 2
    assert "--seq-len (65) exceeds the model's context (model.max_seq_len = 64)" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--top-p", "0"], "top_p must lie in \\(0, 1\\], got 0.0"),
    (["--top-p", "1.5"], "top_p must lie in \\(0, 1\\], got 1.5"),
    (["--prompt", "word " * 80], "has 81 tokens, but the model's context \\(model.max_seq_len\\) is 64"),
])  # fmt: skip
def test_generate_refuses_bad_input(imported, capsys, args, message):
    _, ckpt, _ = imported
    assert main(["generate", str(ckpt), "--prompt", "Hi", *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_generate_needs_a_tokenizer_and_a_checkpoint(imported, tmp_path, capsys, monkeypatch):
    _, ckpt, _ = imported
    monkeypatch.chdir(tmp_path)  # the import's relative data.path (data/shakespeare) must not exist here
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("manifest.json", "rank00000.safetensors"):
        (bare / name).write_bytes((ckpt / name).read_bytes())
    assert main(["generate", str(bare), "--prompt", "Hi"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint directory" in err and "does not exist" in err
