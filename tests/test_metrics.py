"""Parameter counts, FLOPs and MFU (metrics.py) and the rank-0 writers (monitor.py)."""

from __future__ import annotations

import io
import json
import math
import re

import pytest
from distributed import run_ranks
from rich.console import Console

from threefold.config import ModelConfig
from threefold.metrics import count_parameters, flops_per_token, mfu, paper_flops_per_step, peak_flops
from threefold.monitor import MetricsWriter, TrainProgress, plot_loss_curve, tensorboard_run_name
from threefold.presets import MODEL_PRESETS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def preset(name: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})


# ---------------------------------------------------------------- parameter counts


def test_count_parameters_tiny_llama_by_hand():
    cfg = ModelConfig(
        arch="llama",
        vocab_size=100,
        hidden_size=16,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=40,
        max_seq_len=32,
        tie_embeddings=False,
    )
    # head_dim 4; q 16*16 = 256, k and v 16*(2*4) = 128 each, o 16*16 = 256: attention 768
    # gate, up, down 3*16*40 = 1920; two RMSNorms 2*16 = 32: one layer 2720, two layers 5440
    counts = count_parameters(cfg)
    assert counts["per_layer"] == 2720
    assert counts["layers"] == 5440
    assert counts["final_norm"] == 16
    assert counts["non_embedding"] == 5456
    assert counts["input_embedding"] == 1600  # 100 * 16, no position table (RoPE)
    assert counts["output"] == 1600  # untied lm_head
    assert counts["total"] == 1600 + 5456 + 1600
    assert counts["flops_params"] == 5456 + 1600

    tied = count_parameters(ModelConfig(**{**cfg.__dict__, "tie_embeddings": True}))
    assert tied["output"] == 0
    assert tied["total"] == 1600 + 5456
    assert tied["flops_params"] == counts["flops_params"]  # the logits matmul is done either way


def test_count_parameters_counts_qwen2_attention_biases():
    cfg = ModelConfig(
        arch="llama",
        vocab_size=100,
        hidden_size=16,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=40,
        max_seq_len=32,
        attention_bias=True,
    )
    # The llama layer above (2720) plus q, k, v biases 16 + 8 + 8 = 32; o_proj has none.
    counts = count_parameters(cfg)
    assert counts["per_layer"] == 2752
    assert counts["non_embedding"] == 2 * 2752 + 16
    assert counts["total"] == 1600 + 5520 + 1600


def test_count_parameters_tiny_gpt2_by_hand():
    cfg = ModelConfig(
        arch="gpt2",
        vocab_size=100,
        hidden_size=16,
        num_layers=2,
        num_heads=4,
        ffn_hidden_size=64,
        max_seq_len=32,
        tie_embeddings=True,
    )
    # q, k, v, o weights 4*256 = 1024, biases 3*16 + 16 = 64: attention 1088
    # c_fc 16*64 + 64, c_proj 64*16 + 16: MLP 2128; two LayerNorms 2*(16+16) = 64: one layer 3280
    counts = count_parameters(cfg)
    assert counts["per_layer"] == 3280
    assert counts["layers"] == 6560
    assert counts["final_norm"] == 32
    assert counts["input_embedding"] == 100 * 16 + 32 * 16  # tokens + learned positions
    assert counts["output"] == 0
    assert counts["total"] == 2112 + 6592
    # N leaves out both input tables (tokens and positions) but counts the tied output projection.
    assert counts["flops_params"] == 6592 + 1600


def test_count_parameters_matches_published_sizes():
    # Meta's Llama 3 8B: 8,030,261,248 parameters.
    assert count_parameters(preset("llama-8b"))["total"] == 8_030_261_248
    # Llama 3.2 1B shares its embedding (1,235,814,400); the benchmark preset is untied, adding V*h.
    assert count_parameters(preset("llama-1b", tie_embeddings=True))["total"] == 1_235_814_400
    untied = count_parameters(preset("llama-1b"))["total"]
    assert untied == 1_235_814_400 + 128256 * 2048
    assert round(untied / 1e9, 2) == 1.50
    # GPT-2 small as Hugging Face counts it (tied lm_head): 124,439,808.
    assert count_parameters(preset("gpt2-124m"))["total"] == 124_439_808


def test_paper_family_parameters_match_the_papers_approximation():
    # SYSTEM.md: P ~ 12*l*h^2*(1 + 13/(12h) + (V+s)/(12*l*h)), exact for a tied GPT up to the final norm.
    for name in ("gpt3-1.7b", "gpt3-18b", "gpt3-1t"):
        cfg = preset(name)
        num_layers, h, v, s = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.max_seq_len
        approx = 12 * num_layers * h * h * (1 + 13 / (12 * h) + (v + s) / (12 * num_layers * h))
        assert count_parameters(cfg)["total"] == pytest.approx(approx + 2 * h, rel=1e-12)


def _local_numel(rank: int, world: int, cfg: ModelConfig) -> dict[str, int]:
    """Parameters this tensor-parallel rank holds: the whole model, and one layer alone."""
    import torch.distributed as dist

    from threefold.model.transformer import build_model
    from threefold.parallel.layers import TPContext

    def numel(**kw) -> int:
        return sum(p.numel() for p in build_model(cfg, TPContext(dist.group.WORLD), **kw).parameters())

    layer = numel(first_layer=0, last_layer=1, has_embedding=False, has_head=False)
    return {"total": numel(), "per_layer": layer}


TP_MODELS = {
    # GQA, q/k/v biases, a vocabulary that tp_size 2 pads (1001 -> 1002), untied output
    "llama": ModelConfig(arch="llama", vocab_size=1001, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, ffn_hidden_size=64, max_seq_len=16, attention_bias=True),
    # replicated o and c_proj biases, LayerNorms and position table; tied output
    "gpt2": ModelConfig(arch="gpt2", vocab_size=1001, hidden_size=32, num_layers=2, num_heads=4,
                        max_seq_len=16, tie_embeddings=True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TP_MODELS))
def test_count_parameters_per_tensor_parallel_rank_matches_a_built_model(name):
    # The planner's memory model counts a rank's parameters with tp_size; check it against real shards.
    cfg = TP_MODELS[name]
    for got in run_ranks(2, _local_numel, cfg):
        counts = count_parameters(cfg, tp_size=2)
        assert got == {"total": counts["total"], "per_layer": counts["per_layer"]}
        assert counts["output_weight"] == 501 * 32  # ceil(1001 / 2) rows
    assert count_parameters(cfg)["total"] > count_parameters(cfg, tp_size=2)["total"]


def test_count_parameters_refuses_a_tp_size_that_does_not_split_the_heads():
    with pytest.raises(ValueError, match=r"tp_size \(3\) must divide model.num_heads \(4\)"):
        count_parameters(ModelConfig(num_heads=4), tp_size=3)


def test_unknown_arch_is_a_value_error():
    cfg = ModelConfig(arch="llama")
    cfg.arch = "mamba"
    with pytest.raises(ValueError, match="mamba"):
        count_parameters(cfg)


# ---------------------------------------------------------------- FLOPs


def test_flops_per_token_by_hand():
    cfg = ModelConfig(
        arch="llama",
        vocab_size=100,
        hidden_size=16,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=40,
        max_seq_len=32,
        tie_embeddings=True,
    )
    # N = 7056 (see the llama count above); 6*N = 42336; attention 12*l*h*s = 12*2*16*8 = 3072
    assert flops_per_token(cfg, seq_len=8) == 42336 + 3072


@pytest.mark.parametrize("name", ["gpt2-124m", "gpt3-1.7b", "gpt3-18b"])
def test_flops_per_token_agrees_with_the_paper_formula(name):
    # For a GPT block (4h MLP, no GQA), 3x SYSTEM.md's forward count per token is
    #   72*l*h^2*(1 + s/(6h)) + 6*h*V.
    # Ours also counts the biases and norms the paper drops: per layer 13h (q,k,v,o biases 4h, MLP
    # biases 5h, two LayerNorms 4h), plus 2h for the final norm, each at 6 FLOPs per token. So ours is
    # higher by exactly 6*(13*l*h + 2*h), a relative excess below (13/12 + 1/(6l)) / h: 0.14% at h = 768.
    cfg = preset(name)
    num_layers, h, v, s = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.max_seq_len
    paper = 72 * num_layers * h * h * (1 + s / (6 * h)) + 6 * h * v
    ours = flops_per_token(cfg, s)
    assert ours - paper == pytest.approx(6 * (13 * num_layers * h + 2 * h), rel=1e-9)
    assert 0 < (ours - paper) / paper < (13 / 12 + 1 / (6 * num_layers)) / h

    # paper_flops_per_step is that same per-token figure times B*s.
    batch = 8
    assert paper_flops_per_step(cfg, batch, s, recompute=False) == pytest.approx(paper * batch * s, rel=1e-12)


def test_paper_recompute_adds_one_forward_of_the_layers():
    cfg = preset("gpt3-7.5b")
    b, s, num_layers, h = 4, cfg.max_seq_len, cfg.num_layers, cfg.hidden_size
    extra = paper_flops_per_step(cfg, b, s, recompute=True) - paper_flops_per_step(cfg, b, s, recompute=False)
    assert extra == pytest.approx(24 * b * s * num_layers * h * h * (1 + s / (6 * h)), rel=1e-12)


def test_peak_flops_by_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("cpu") is None
    assert peak_flops("NVIDIA GeForce RTX 4090") is None


def test_mfu_reproduces_the_benchmark_table():
    # BENCHMARKS.md: TorchTitan, llama-1b at seq 2048 on one H100, 54,700 tokens/s/GPU = 45.5% MFU.
    cfg = preset("llama-1b")
    value = mfu(54_700, flops_per_token(cfg, 2048), peak_flops("NVIDIA H100 80GB HBM3"))
    assert value == pytest.approx(0.455, abs=5e-4)
    assert mfu(54_700, flops_per_token(cfg, 2048), None) is None


# ---------------------------------------------------------------- MetricsWriter and the plot


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path / "run") as writer:
        for step in range(1, 4):
            writer.log(step, {"train/loss": 5.0 - step, "train/lr": 1e-3 * step})
        writer.log(3, {"val/loss": 2.5, "train/mfu": None})
        writer.log(4, {"train/loss": float("nan")})

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: NaN was written as null
    assert records[0] == {"step": 1, "train/loss": 4.0, "train/lr": 1e-3}
    assert records[3] == {"step": 3, "val/loss": 2.5, "train/mfu": None}
    assert records[4] == {"step": 4, "train/loss": None}
    assert "NaN" not in "".join(lines)

    events = list((tmp_path / "run" / "tb" / "run").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "run" / "tb" / "run"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss[:3]] == [4.0, 3.0, 2.0]
    assert math.isnan(loss[3].value)
    assert [e.value for e in acc.Scalars("val/loss")] == [2.5]


def test_each_start_of_a_run_gets_its_own_tensorboard_run(tmp_path):
    """A resumed run writes a new, named TensorBoard run; a second start within the same second too."""
    names = [
        tensorboard_run_name(0, now=0.0),
        tensorboard_run_name(64, now=3600.0),
        tensorboard_run_name(64, now=3600.0),
    ]
    assert names[1].endswith("-from-step-64") and not names[0].endswith("-from-step-0")
    dirs = []
    for name in names:
        with MetricsWriter(tmp_path, run_name=name) as writer:
            writer.log(1, {"train/loss": 1.0})
            dirs.append(writer.tb_dir)
    assert [d.name for d in dirs] == [names[0], names[1], names[1] + "-2"]
    assert all(list(d.glob("events.out.tfevents.*")) for d in dirs)
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == sorted(d.name for d in dirs)


def test_metrics_writer_appends_and_can_skip_tensorboard(tmp_path):
    for step in (1, 2):
        with MetricsWriter(tmp_path, tensorboard=False) as writer:
            writer.log(step, {"train/loss": 1.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "tb").exists()


def test_plot_loss_curve_writes_a_png(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(1, 21):
            writer.log(step, {"train/loss": 4.0 / step, "train/lr": 1e-3})
            if step % 5 == 0:
                writer.log(step, {"val/loss": 4.5 / step})
    png = tmp_path / "plots" / "loss.png"
    plot_loss_curve(jsonl, png)
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in png.parent.iterdir()) == ["loss.png"]  # no temp file left behind


def test_plot_loss_curve_tolerates_a_cut_last_line_and_rejects_no_loss(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/lo')
    plot_loss_curve(jsonl, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_SIGNATURE

    jsonl.write_text('{"step": 1, "train/lr": 0.001}\n{"step": 2, "train/loss": null}\n')
    with pytest.raises(ValueError, match="no 'train/loss'"):
        plot_loss_curve(jsonl, tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()

    jsonl.write_text('{"step": 1, "train/loss": 3.0}\nnot json\n{"step": 2, "train/loss": 2.0}\n')
    with pytest.raises(ValueError, match=":2 is not valid JSON"):
        plot_loss_curve(jsonl, tmp_path / "c.png")


# ---------------------------------------------------------------- TrainProgress


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=200), buffer


FIELDS = dict(loss=3.21, lr=3e-4, grad_norm=0.8, tokens_per_s=54_700.0, tflops_per_device=450.0, mfu=0.455)


def test_train_progress_disabled_is_a_no_op():
    console, buffer = _console(terminal=True)
    with TrainProgress(10, enabled=False, console=console) as progress:
        for step in range(1, 11):
            progress.update(step, **FIELDS)
        progress.print("eval done")
    progress.close()
    assert buffer.getvalue() == ""


def test_train_progress_on_a_terminal_draws_the_bar():
    console, buffer = _console(terminal=True)
    with TrainProgress(10, enabled=True, console=console) as progress:
        for step in range(1, 11):
            progress.update(step, **{**FIELDS, "mfu": None} if step == 10 else FIELDS)
        progress.print("val loss 3.0")
    out = buffer.getvalue()
    assert "10/10" in out
    assert "MFU n/a" in out  # the last frame, drawn when the bar stops
    assert "tok/s/dev 54.7k" in out
    assert "val loss 3.0" in out


def test_train_progress_without_a_terminal_prints_plain_lines():
    console, buffer = _console(terminal=False)
    with TrainProgress(100, enabled=True, print_every=25, console=console) as progress:
        for step in range(1, 101):
            progress.update(step, **FIELDS, tokens_per_s_total=1e5)
    lines = buffer.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == [f"step {s}/100" for s in (1, 26, 51, 76, 100)]
    assert "\x1b[" not in buffer.getvalue()  # no escape codes in a log file
    assert re.sub(r"\| 0:00:0\d \| ", "| ", lines[0]) == (
        "step 1/100 | loss 3.2100 | lr 3.00e-04 | gnorm 0.800 | tok/s/dev 54.7k | TFLOP/s/dev 450 | "
        "MFU 45.5% | tokens_per_s_total 1e+05"
    )
