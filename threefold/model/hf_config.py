"""Hugging Face config.json <-> threefold's ModelConfig, for Llama / Qwen2 / Mistral and GPT-2.

Reading refuses, with a ValueError naming the key, what threefold's blocks would not reproduce exactly
(other RoPE scalings, a sliding window that bites, biases or activations they lack). The weights and the
checkpoint files are threefold.model.hf's, which also exports both functions here.
"""

from __future__ import annotations

from typing import Any

from threefold.config import ModelConfig, check_rope_scaling


def check_arch(cfg: ModelConfig) -> None:
    """ValueError unless `cfg.arch` has a Hugging Face format (llama, gpt2)."""
    if cfg.arch not in ("llama", "gpt2"):
        raise ValueError(f"no Hugging Face format for model.arch {cfg.arch!r}; known: llama, gpt2")


def hf_config(cfg: ModelConfig, *, eos_token_id: int | None = None) -> dict[str, Any]:
    """The config.json of the equivalent HF model.

    bos/eos ids are written explicitly (the tokenizer's end-of-text id, or null) so HF's per-model
    defaults (1/2 for Llama, 50256 for GPT-2) cannot slip in for a different tokenizer.
    """
    check_arch(cfg)
    common = {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
    }
    arch = _llama_hf_config(cfg) if cfg.arch == "llama" else _gpt2_hf_config(cfg)
    return {**arch, **common}


def _llama_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The architecture's keys: Llama, or Qwen2 when q, k, v have biases."""
    scaling = {}
    if cfg.rope_scaling_factor != 1.0:
        scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    if cfg.attention_bias:
        # Qwen2 always biases q, k, v (its config has no switch) and never o; sliding window off.
        arch: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "use_sliding_window": False,
            "sliding_window": None,
        }
    else:
        arch = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "head_dim": cfg.head_dim,
            "attention_bias": False,
            "mlp_bias": False,
        }
    return {
        **arch,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta and rope_scaling at the top level, 5.x reads
        # rope_parameters (and takes rope_scaling over it when both are set): all three agree.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta} | scaling,
        "rope_scaling": scaling or None,
        "hidden_act": "silu",
    }


def _gpt2_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.num_kv_heads != cfg.num_heads:
        raise ValueError(
            f"GPT-2 checkpoints have no grouped-query attention: num_kv_heads ({cfg.num_kv_heads}) "
            f"must equal num_heads ({cfg.num_heads})"
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": cfg.hidden_size,
        "n_inner": cfg.ffn_hidden_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_positions": cfg.max_seq_len,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": "gelu_new",
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


_REQUIRED: Any = object()


def _int(hf: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """`hf[key]`, a positive integer; absent or null gives `default`, and a required key must be there."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"lacks the required key {key!r}")
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{key} = {value!r} must be a positive integer")
    return value


def _float(hf: dict[str, Any], key: str, default: float) -> float:
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{key} = {value!r} must be a number")
    return float(value)


def _bool(hf: dict[str, Any], key: str, default: bool) -> bool:
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{key} = {value!r} must be true or false")
    return value


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's RoPE fields of a Llama-family config: plain RoPE or Llama 3.x scaling, nothing else.

    The parameters come from where transformers takes them: `rope_scaling` when set (4.x reads only it,
    5.x prefers it), else `rope_parameters`; rope_theta from that dict or the top level.
    """
    source = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    p = hf.get(source) or {}
    if not isinstance(p, dict):
        raise ValueError(f"{source} = {p!r} must be an object")
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(
            f"{source} with rope_type {kind!r} is not supported: threefold implements plain RoPE and "
            "Llama 3.x ('llama3') scaling only (no linear/dynamic/yarn/longrope)"
        )
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}.partial_rotary_factor {p['partial_rotary_factor']} is not supported")
    fields: dict[str, Any] = {"rope_theta": _float(p, "rope_theta", _float(hf, "rope_theta", 10000.0))}
    if kind == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if p.get(k) is None]
        if missing:
            raise ValueError(f"{source} with rope_type 'llama3' lacks {missing}")
        fields |= {
            "rope_scaling_factor": _float(p, "factor", 1.0),
            "rope_low_freq_factor": _float(p, "low_freq_factor", 1.0),
            "rope_high_freq_factor": _float(p, "high_freq_factor", 4.0),
            # transformers falls back to the model's context length, as here.
            "rope_original_max_len": _int(
                p, "original_max_position_embeddings", _int(hf, "max_position_embeddings", 2048)
            ),
        }
    return fields


def _check_no_sliding_window(hf: dict[str, Any], model_type: str, max_len: int) -> None:
    """Accept a sliding window only where it never bites: off, or at least the whole context."""
    # Qwen2 ignores sliding_window unless use_sliding_window is set.
    ignored = model_type == "qwen2" and not _bool(hf, "use_sliding_window", False)
    window = None if ignored else _int(hf, "sliding_window", None)
    if window is not None and window < max_len:
        switch = "use_sliding_window = true and " if model_type == "qwen2" else ""
        raise ValueError(
            f"{switch}sliding_window = {window} < max_position_embeddings ({max_len}) is not supported: "
            "threefold has no sliding-window attention (it needs no window, or one >= the context)"
        )


def _require(hf: dict[str, Any], key: str, supported: Any, why: str) -> None:
    if key in hf and hf[key] is not None and hf[key] != supported:
        raise ValueError(f"{key} = {hf[key]!r} is not supported ({why}; threefold needs {supported!r})")


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig of an HF config.json dict; ValueError for what threefold lacks, for a required key
    that is missing and for a value of the wrong type (naming the key).

    model_type llama, qwen2 (llama with q/k/v biases) and mistral (llama, if its sliding window never
    applies) give arch 'llama'; gpt2 gives arch 'gpt2'.
    """
    model_type = hf.get("model_type")
    if model_type in ("llama", "qwen2", "mistral"):
        cfg = _llama_model_config(hf, model_type)
    elif model_type == "gpt2":
        cfg = _gpt2_model_config(hf)
    else:
        raise ValueError(
            f"model_type {model_type!r} is not supported; threefold converts 'llama', 'qwen2', "
            "'mistral' and 'gpt2'"
        )
    assert cfg.num_kv_heads is not None  # filled in by ModelConfig.__post_init__
    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(
            f"heads do not fit: hidden size {cfg.hidden_size}, {cfg.num_heads} heads, "
            f"{cfg.num_kv_heads} kv heads"
        )
    cfg.check()  # what the model itself needs (positive sizes, finite numbers, ...)
    return cfg


def _llama_model_config(hf: dict[str, Any], model_type: str) -> ModelConfig:
    _require(hf, "hidden_act", "silu", "threefold's Llama MLP is SwiGLU")
    if model_type != "qwen2":  # Qwen2's biases are fixed by the architecture, not by these keys
        _require(
            hf,
            "attention_bias",
            False,
            "a Llama attention_bias also biases o_proj; threefold biases only q, k, v, as Qwen2 does",
        )
        _require(hf, "mlp_bias", False, "threefold's Llama MLP has no biases")
    heads, hidden = _int(hf, "num_attention_heads"), _int(hf, "hidden_size")
    if hidden % heads:
        raise ValueError(f"num_attention_heads ({heads}) must divide hidden_size ({hidden})")
    _require(hf, "head_dim", hidden // heads, "threefold derives head_dim as hidden/heads")
    max_len = _int(hf, "max_position_embeddings", 2048)
    _check_no_sliding_window(hf, model_type, max_len)
    cfg = ModelConfig(
        arch="llama",
        vocab_size=_int(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=_int(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_int(hf, "num_key_value_heads", heads),
        ffn_hidden_size=_int(hf, "intermediate_size"),
        max_seq_len=max_len,
        **_rope_fields(hf),
        attention_bias=model_type == "qwen2",
        norm_eps=_float(hf, "rms_norm_eps", 1e-6),
        tie_embeddings=_bool(hf, "tie_word_embeddings", False),
        init_std=_float(hf, "initializer_range", 0.02),
    )
    try:
        check_rope_scaling(cfg)
    except ValueError as e:
        raise ValueError(f"unsupported llama3 RoPE scaling in the Hugging Face config: {e}") from None
    return cfg


def _gpt2_model_config(hf: dict[str, Any]) -> ModelConfig:
    # gelu_pytorch_tanh is the same tanh approximation as gelu_new, computed by torch.
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"activation_function = {hf['activation_function']!r} is not supported "
            "(threefold's GPT-2 MLP uses the tanh GeLU, 'gelu_new')"
        )
    _require(hf, "scale_attn_weights", True, "threefold scales attention scores by 1/sqrt(d)")
    _require(hf, "scale_attn_by_inverse_layer_idx", False, "threefold has no per-layer attention scale")
    _require(hf, "add_cross_attention", False, "threefold is decoder-only")
    hidden, heads = _int(hf, "n_embd"), _int(hf, "n_head")
    return ModelConfig(
        arch="gpt2",
        vocab_size=_int(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=_int(hf, "n_layer"),
        num_heads=heads,
        num_kv_heads=heads,
        ffn_hidden_size=_int(hf, "n_inner", 4 * hidden),
        max_seq_len=_int(hf, "n_positions", 1024),
        norm_eps=_float(hf, "layer_norm_epsilon", 1e-5),
        tie_embeddings=_bool(hf, "tie_word_embeddings", True),
        init_std=_float(hf, "initializer_range", 0.02),
    )
