"""Hugging Face interop: threefold's Llama (also as Qwen2, Mistral, Llama 3.x RoPE scaling) and GPT-2
reproduce `transformers`' logits from the same weights (unsharded and at tp=2), and conversions, configs
and checkpoints round-trip exactly."""

import dataclasses
import json
from functools import cache

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from safetensors.torch import load_file, save_file

from threefold.config import ModelConfig
from threefold.metrics import count_parameters
from threefold.model.hf import (
    from_hf_state_dict,
    hf_config,
    load_hf_checkpoint,
    model_config_from_hf,
    save_hf_checkpoint,
    to_hf_state_dict,
)
from threefold.model.transformer import build_model, gather_logits, rope_frequencies
from threefold.parallel.layers import TPContext, shard_of
from threefold.presets import MODEL_PRESETS

transformers = pytest.importorskip("transformers")
ROPE_INIT_FUNCTIONS = pytest.importorskip("transformers.modeling_rope_utils").ROPE_INIT_FUNCTIONS

TOL = 1e-5
BATCH, SEQ = 2, 16
# Llama 3.1's scaling with its pretraining context shrunk from 8192 to 16 tokens, so that a 32-token
# sequence runs past it and the slowed rotations change the logits.
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _hf_config(case: str):
    tied = case in ("llama-tied", "qwen2")
    llama_family = dict(
        vocab_size=1001 if tied else 1000,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: two query heads per kv head
        max_position_embeddings=32,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
    )
    if case == "llama3-rope":
        llama_family["rope_parameters"] |= LLAMA3_SCALING
    if case.startswith("llama"):
        return transformers.LlamaConfig(**llama_family)
    if case == "qwen2":
        return transformers.Qwen2Config(**llama_family, use_sliding_window=False)
    if case == "mistral":
        return transformers.MistralConfig(**llama_family, sliding_window=None)
    return transformers.GPT2Config(
        vocab_size=1001,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=None,
        eos_token_id=None,
    )


@cache
def _reference(case: str) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(config dict, state dict, input ids, fp32 logits) of a randomly initialized HF model."""
    config = _hf_config(case)
    torch.manual_seed(0)
    model_cls = {
        "gpt2": transformers.GPT2LMHeadModel,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }.get(case, transformers.LlamaForCausalLM)
    model = model_cls._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        # HF starts norms at one and biases at zero; perturb everything so a swapped or dropped
        # norm weight or bias would change the logits.
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seq = 32 if case == "llama3-rope" else SEQ  # past the shrunk pretraining context (see LLAMA3_SCALING)
    ids = torch.randint(0, config.vocab_size, (BATCH, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    return model.config.to_dict(), model.state_dict(), ids, logits


def _threefold_logits(rank: int, world: int, hf_cfg: dict, hf_state: dict, ids: torch.Tensor):
    cfg = model_config_from_hf(hf_cfg)
    state = from_hf_state_dict(cfg, hf_state)
    group = dist.group.WORLD
    model = build_model(cfg, TPContext(group), seed=123)
    if world == 1:
        model.load_state_dict(state, strict=True)
    else:
        model.load_state_dict(
            {name: shard_of(state[name], p, rank, world) for name, p in model.named_parameters()},
            strict=True,
        )
    with torch.no_grad():
        logits = gather_logits(model(ids), group, cfg.vocab_size)
    return logits if rank == 0 else None


CASES = ["llama-untied", "llama-tied", "gpt2", "qwen2", "mistral", "llama3-rope"]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tp):
    hf_cfg, hf_state, ids, expected = _reference(case)
    assert expected.abs().max() > 0.5, "logits this small would make the tolerance meaningless"
    got = run_ranks(tp, _threefold_logits, hf_cfg, hf_state, ids)[0]
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff < TOL, f"{case} tp={tp}: max |logits - transformers| = {diff:.3g}"


def test_llama3_rope_scaling_changes_the_logits():
    # Without this the parity test above could pass with the scaling ignored.
    hf_cfg, hf_state, ids, expected = _reference("llama3-rope")
    plain = hf_cfg | {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    unscaled = run_ranks(1, _threefold_logits, plain, hf_state, ids)[0]
    assert (unscaled - expected).abs().max().item() > 1000 * TOL


@pytest.mark.parametrize(
    "head_dim, theta, scaling",
    [
        (16, 500000.0, LLAMA3_SCALING),
        # Llama 3.1 8B: its 64 frequencies fall in all three bands (kept, blended, divided by 8).
        (128, 500000.0, LLAMA3_SCALING | {"original_max_position_embeddings": 8192}),
        (64, 10000.0, LLAMA3_SCALING | {"factor": 32.0, "original_max_position_embeddings": 8192}),
    ],
)
def test_llama3_rope_frequencies_match_transformers(head_dim, theta, scaling):
    hf = transformers.LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        max_position_embeddings=131072,
        rope_parameters={"rope_theta": theta} | scaling,
    )
    expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert attention_factor == 1.0  # llama3 does not rescale cos and sin, and threefold does not either
    got = rope_frequencies(model_config_from_hf(hf.to_dict()), torch.device("cpu"))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("case", CASES)
def test_parameter_count_matches_transformers(case):
    hf_cfg, hf_state, _, _ = _reference(case)
    cfg = model_config_from_hf(hf_cfg)
    expected = sum(t.numel() for t in from_hf_state_dict(cfg, hf_state).values())  # tied head once
    assert count_parameters(cfg)["total"] == expected


@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip_is_exact(case):
    hf_cfg, hf_state, _, _ = _reference(case)
    cfg = model_config_from_hf(hf_cfg)
    ours = from_hf_state_dict(cfg, hf_state)
    back = to_hf_state_dict(cfg, ours)
    # HF lists the tied head under both names in state_dict() but saves it once; so do we.
    expected = {k: v for k, v in hf_state.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name
    again = from_hf_state_dict(cfg, back)
    assert again.keys() == ours.keys()
    assert all(torch.equal(again[k], ours[k]) for k in ours)


def test_gpt2_without_transformer_prefix():
    # The original GPT-2 checkpoint was saved from GPT2Model: `h.0.attn...`, `wte.weight`, no head.
    hf_cfg, hf_state, _, _ = _reference("gpt2")
    cfg = model_config_from_hf(hf_cfg)
    bare = {k.removeprefix("transformer."): v for k, v in hf_state.items() if k != "lm_head.weight"}
    ours, expected = from_hf_state_dict(cfg, bare), from_hf_state_dict(cfg, hf_state)
    assert all(torch.equal(ours[k], expected[k]) for k in expected) and ours.keys() == expected.keys()


def test_tied_head_that_differs_is_rejected():
    hf_cfg, hf_state, _, _ = _reference("llama-tied")
    state = dict(hf_state, **{"lm_head.weight": hf_state["lm_head.weight"] + 1})
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        from_hf_state_dict(model_config_from_hf(hf_cfg), state)


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_round_trip_and_transformers_loads_it(case, tmp_path):
    hf_cfg, hf_state, ids, expected = _reference(case)
    cfg = model_config_from_hf(hf_cfg)
    state = from_hf_state_dict(cfg, hf_state)
    out = save_hf_checkpoint(cfg, state, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no temporary directory left behind"
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) != cfg.tie_embeddings

    loaded_cfg, loaded = load_hf_checkpoint(out)
    assert loaded_cfg == cfg
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        logits = model.eval()(ids).logits
    assert logits.dtype == torch.float32
    assert (logits - expected).abs().max().item() < 1e-6


def test_save_replaces_an_existing_checkpoint_only_when_asked(tmp_path):
    hf_cfg, hf_state, _, _ = _reference("llama-tied")
    cfg = model_config_from_hf(hf_cfg)
    state = from_hf_state_dict(cfg, hf_state)
    save_hf_checkpoint(cfg, {k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"ckpt' is not empty \(config.json, model.safetensors\)"):
        save_hf_checkpoint(cfg, state, tmp_path / "ckpt")
    save_hf_checkpoint(cfg, state, tmp_path / "ckpt", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    _, loaded = load_hf_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_sharded_checkpoint_loads(tmp_path):
    hf_cfg, hf_state, _, _ = _reference("gpt2")
    cfg = model_config_from_hf(hf_cfg)
    hf = to_hf_state_dict(cfg, from_hf_state_dict(cfg, hf_state))
    names = sorted(hf)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: hf[k] for k in part}, tmp_path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg)))
    loaded_cfg, loaded = load_hf_checkpoint(tmp_path)
    assert loaded_cfg == cfg
    expected = from_hf_state_dict(cfg, hf)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def _rewrite_weights(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.gate_proj.weight"), r"missing keys.*layers\.1\.mlp\.gate_proj"),
        (
            lambda t: t.update({"model.norm.weight": torch.ones(65)}),
            r"wrong shapes.*model\.norm\.weight: got \(65,\), expected \(64,\)",
        ),
        (
            lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.ones(1)}),
            r"unexpected keys.*layers\.2",
        ),
    ],
    ids=["missing", "shape", "unexpected"],
)
def test_bad_checkpoint_names_the_problem(tmp_path, edit, message):
    hf_cfg, hf_state, _, _ = _reference("llama-untied")
    cfg = model_config_from_hf(hf_cfg)
    out = save_hf_checkpoint(cfg, from_hf_state_dict(cfg, hf_state), tmp_path / "ckpt")
    _rewrite_weights(out, edit)
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(out)


def test_bad_threefold_state_names_the_problem():
    cfg = ModelConfig(arch="gpt2", vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, max_seq_len=4)
    with pytest.raises(ValueError, match=r"missing keys: \['embed_positions.weight'"):
        to_hf_state_dict(cfg, {"embed_tokens.weight": torch.zeros(10, 8)})


QWEN2 = ModelConfig(arch="llama", attention_bias=True, num_kv_heads=2, rope_theta=1e6, tie_embeddings=True)
LLAMA31_ROPE = ModelConfig(
    arch="llama",
    max_seq_len=131072,
    rope_theta=500000.0,
    rope_scaling_factor=8.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_len=8192,
)
CONFIGS = [
    ModelConfig(arch="llama", vocab_size=1001, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2),
    ModelConfig(arch="llama", rope_theta=500000.0, norm_eps=1e-6, tie_embeddings=True, init_std=0.01),
    ModelConfig(arch="gpt2", vocab_size=1001, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=96),
    ModelConfig(arch="gpt2", tie_embeddings=False, max_seq_len=64),
    QWEN2,
    LLAMA31_ROPE,
    ModelConfig(arch="llama", attention_bias=True, rope_scaling_factor=4.0, rope_original_max_len=512),
] + [ModelConfig(**preset) for preset in MODEL_PRESETS.values()]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_config_round_trip(cfg):
    assert model_config_from_hf(hf_config(cfg)) == cfg
    # And transformers reads our config.json as the same model.
    raw = hf_config(cfg)
    hf = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    assert model_config_from_hf(hf.to_dict()) == cfg


def test_config_export_picks_the_model_type():
    assert hf_config(CONFIGS[0])["architectures"] == ["LlamaForCausalLM"]
    qwen2 = hf_config(QWEN2)
    assert (qwen2["model_type"], qwen2["architectures"]) == ("qwen2", ["Qwen2ForCausalLM"])
    assert "attention_bias" not in qwen2  # a Llama attention_bias would bias o_proj too


def test_llama3_config_from_transformers_4():
    # transformers 4.x configs carry rope_theta and rope_scaling at the top level, no rope_parameters.
    raw = {k: v for k, v in hf_config(LLAMA31_ROPE).items() if k != "rope_parameters"}
    assert raw["rope_scaling"]["rope_type"] == "llama3"
    assert model_config_from_hf(raw) == LLAMA31_ROPE
    # Without an original context transformers takes the model's own, and so does threefold.
    del raw["rope_scaling"]["original_max_position_embeddings"]
    assert model_config_from_hf(raw).rope_original_max_len == 131072


@pytest.mark.parametrize(
    "change",
    [
        {"model_type": "mistral", "sliding_window": None},
        {"model_type": "mistral", "sliding_window": 1024},  # the whole context: never applies
        {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 32},  # switched off
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4096},
    ],
    ids=["mistral-none", "mistral-whole-context", "qwen2-off", "qwen2-whole-context"],
)
def test_sliding_window_that_never_applies_is_accepted(change):
    cfg = model_config_from_hf(hf_config(CONFIGS[0]) | change)
    assert cfg == dataclasses.replace(CONFIGS[0], attention_bias=change["model_type"] == "qwen2")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "rope_scaling with rope_type 'yarn' is not supported",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
            "rope_parameters with rope_type 'yarn'",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            r"rope_scaling with rope_type 'llama3' lacks \['low_freq_factor', 'high_freq_factor'\]",
        ),
        (
            {"rope_parameters": LLAMA3_SCALING | {"rope_theta": 1e4, "high_freq_factor": 1.0}},
            r"rope_high_freq_factor \(1\.0\) must exceed model\.rope_low_freq_factor \(1\.0\)",
        ),
        ({"attention_bias": True}, "attention_bias = True is not supported .*biases o_proj"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
        ({"model_type": "gemma"}, "model_type 'gemma' is not supported"),
        (
            {"model_type": "mistral", "sliding_window": 512},
            r"sliding_window = 512 < max_position_embeddings \(1024\) is not supported: "
            "threefold has no sliding-window attention",
        ),
        (
            {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 512},
            r"use_sliding_window = true and sliding_window = 512 < max_position_embeddings \(1024\)",
        ),
    ],
    ids=[
        "yarn-rope-scaling",
        "yarn-rope-parameters",
        "llama3-incomplete",
        "llama3-bad-bands",
        "llama-attention-bias",
        "gelu",
        "head-dim",
        "unknown-model-type",
        "mistral-sliding-window",
        "qwen2-sliding-window",
    ],
)
def test_unsupported_hf_configs_are_rejected(change, message):
    hf = hf_config(CONFIGS[0]) | change
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(hf)


def test_gpt2_config_needs_multi_head_attention():
    with pytest.raises(ValueError, match=r"num_kv_heads \(2\) must equal num_heads \(4\)"):
        hf_config(ModelConfig(arch="gpt2", num_heads=4, num_kv_heads=2))
