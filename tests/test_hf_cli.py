"""`threefold import-hf` / `export-hf`: a transformers model trains under any layout and comes back out."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from distributed import run_ranks
from tiny import defaults, tiny_config

from threefold.cli import main
from threefold.config import OptimizerConfig
from threefold.data.dataset import TokenDataset, eval_batches
from threefold.parallel.mesh import build_mesh
from threefold.train import train

VAL_SEQS = 4


def _hf_model(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=50257, n_embd=32, n_layer=4, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # norms and biases away from 1 and 0, so a mix-up shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _val_loss(model, data: Path) -> float:
    """The validation loss threefold reports, computed with the transformers model."""
    dataset = TokenDataset(data, "val", 16)
    batches = eval_batches(dataset, num_sequences=VAL_SEQS, micro_batch_size=2, dp_rank=0, dp_size=1)
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()) for x, y in batches]
    return float(torch.stack(losses).mean())


def _train(rank: int, world: int, config) -> dict:
    p = config.parallel
    mesh = build_mesh(p.tp_size, p.dp_size, p.pp_size)
    result = train(config, mesh, torch.device("cpu"))
    return {"val": result.val_losses}


def _config(model_toml: Path, data: Path, run: Path, load: Path, tp: int, pp: int, steps: int):
    import tomllib

    model = tomllib.loads(model_toml.read_text())["model"]
    return tiny_config(
        data, run, tp=tp, pp=pp, model=model, optimizer=defaults(OptimizerConfig),
        training=dict(max_steps=steps, global_batch_size=4, eval_interval=steps, eval_sequences=VAL_SEQS),
        checkpoint=dict(load=str(load)),
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_import_train_export_round_trip(sonnets_dataset, tmp_path, arch):
    hf = _hf_model(arch)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    expected = _val_loss(hf, sonnets_dataset)
    model_toml = tmp_path / "imported" / "model.toml"

    # The imported weights give transformers' loss under one process and under tp=2 x pp=2.
    for tp, pp in ((1, 1), (2, 2)):
        config = _config(
            model_toml, sonnets_dataset, tmp_path / f"run{tp}{pp}", tmp_path / "imported", tp, pp, 2
        )
        val = run_ranks(tp * pp, _train, config)[0]["val"]
        assert val[0] == pytest.approx(expected, rel=1e-5, abs=0)

    # Export straight back: transformers loads it and computes identical logits.
    assert main(["export-hf", str(tmp_path / "imported"), str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max() < 1e-5

    # Export what tp=2 x pp=2 trained for 2 steps: transformers reproduces threefold's loss at step 2.
    trained = tmp_path / "run22" / "ckpt"
    assert json.loads((trained / "step_2" / "manifest.json").read_text())["layout"]["tp_size"] == 2
    assert main(["export-hf", str(trained), str(tmp_path / "trained")]) == 0
    moved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "trained").eval()
    config = _config(model_toml, sonnets_dataset, tmp_path / "run22", tmp_path / "imported", 2, 2, 2)
    resumed_val = run_ranks(4, _train, config)[0]["val"]  # resumes at step 2: evaluates nothing new
    assert resumed_val == {}
    metrics = (tmp_path / "run22" / "logs" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    (threefold_val,) = [r["val/loss"] for r in rows if r["step"] == 2 and "val/loss" in r]
    assert _val_loss(moved, sonnets_dataset) == pytest.approx(threefold_val, rel=1e-5, abs=0)


def test_import_refuses_a_directory_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["import-hf", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "is not a Hugging Face checkpoint: no config.json" in capsys.readouterr().err


def test_export_splits_large_weights_into_indexed_shards(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    # 4 MB shards: the 6.4 MB embedding and lm_head each go alone, the layers share files.
    assert (
        main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--max-shard-gb", str(4 / 1024)])
        == 0
    )
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (tmp_path / "out" / "model.safetensors").exists()
    assert all((tmp_path / "out" / f).is_file() for f in files)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
