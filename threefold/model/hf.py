"""Hugging Face interop: threefold's full state dict <-> Llama-family / GPT2LMHeadModel checkpoints.

"Full" means unsharded and unpadded, named as `Transformer.named_parameters()` names them for a model
holding every layer, the embedding and the head (`layers.0.self_attn.q_proj.weight`, ...); tied models
have no `lm_head.weight`. Shapes: h hidden, f MLP width, V vocabulary, a/k query/kv heads, d head dim.

Llama maps name for name (plus the `model.` prefix). threefold's RoPE rotates the two halves of each
head (HF's `rotate_half`), not interleaved pairs, so q/k rows need no permutation. The same names and
layout serve Qwen2 (Llama plus q/k/v biases: `attention_bias`) and Mistral without a sliding window
(exactly Llama); threefold's llama arch is exported as `llama`, or as `qwen2` when it has the biases,
since a Llama config's `attention_bias` would also put a bias on o_proj. GPT-2 stores its
projections as `Conv1D` (weight (in, out), the transpose of `nn.Linear`) and fuses q, k, v into one
`c_attn` along the output dimension.

This module maps the weights and reads and writes checkpoint directories; threefold.model.hf_config
maps the config.json (both public functions are importable from here).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from threefold.config import ModelConfig
from threefold.files import check_output_dir, inside, staged_dir
from threefold.model.hf_config import check_arch, hf_config, model_config_from_hf

State = dict[str, torch.Tensor]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# Buffers HF has written into checkpoints at some point; they are derived from the config, not learned.
_HF_BUFFERS = {
    "llama": re.compile(r"\.rotary_emb\.(inv_freq|original_inv_freq)$"),
    "gpt2": re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$"),
}


def threefold_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of the full (unsharded, unpadded) model."""
    check_arch(cfg)
    h, f, vocab = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    assert f is not None and cfg.num_kv_heads is not None  # filled in by ModelConfig.__post_init__
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    gpt2 = cfg.arch == "gpt2"
    biased = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} if cfg.attention_bias else set()
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (vocab, h)}
    if gpt2:
        shapes["embed_positions.weight"] = (cfg.max_seq_len, h)
    for i in range(cfg.num_layers):
        linears = {
            "self_attn.q_proj": (q_out, h),
            "self_attn.k_proj": (kv_out, h),
            "self_attn.v_proj": (kv_out, h),
            "self_attn.o_proj": (h, q_out),
            "mlp.up_proj": (f, h),
            "mlp.down_proj": (h, f),
        }
        if not gpt2:
            linears["mlp.gate_proj"] = (f, h)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"layers.{i}.{norm}.weight"] = (h,)
            if gpt2:
                shapes[f"layers.{i}.{norm}.bias"] = (h,)
        for name, (out_features, in_features) in linears.items():
            shapes[f"layers.{i}.{name}.weight"] = (out_features, in_features)
            if gpt2 or name in biased:
                shapes[f"layers.{i}.{name}.bias"] = (out_features,)
    shapes["norm.weight"] = (h,)
    if gpt2:
        shapes["norm.bias"] = (h,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the HF checkpoint (tied output weight omitted, as HF saves it)."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in threefold_shapes(cfg).items()}
    return {name: tuple(t.shape) for name, t in _CONVERT_TO_HF[cfg.arch](cfg, meta).items()}


def _check_state(expected: dict[str, tuple[int, ...]], state: State, what: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{name}: got {tuple(state[name].shape)}, expected {expected[name]}"
        for name in sorted(set(expected) & set(state))
        if tuple(state[name].shape) != expected[name]
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = items[:20] + ([f"... {len(items) - 20} more"] if len(items) > 20 else [])
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{what} does not match the model config: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- llama


def _llama_to_hf(cfg: ModelConfig, state: State) -> State:
    return {name if name == "lm_head.weight" else f"model.{name}": t for name, t in state.items()}


def _llama_from_hf(cfg: ModelConfig, hf: State) -> State:
    return {name.removeprefix("model."): t for name, t in hf.items()}


# ----------------------------------------------------------------------------------------------- gpt2

# threefold name inside a layer -> GPT-2 module inside `transformer.h.N` (norms and biases only rename).
_GPT2_LAYER = {
    "input_layernorm": "ln_1",
    "post_attention_layernorm": "ln_2",
    "self_attn.o_proj": "attn.c_proj",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}


def _gpt2_to_hf(cfg: ModelConfig, state: State) -> State:
    hf = {
        "transformer.wte.weight": state["embed_tokens.weight"],
        "transformer.wpe.weight": state["embed_positions.weight"],
        "transformer.ln_f.weight": state["norm.weight"],
        "transformer.ln_f.bias": state["norm.bias"],
    }
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for src, dst in _GPT2_LAYER.items():
            weight = state[f"{ours}{src}.weight"]
            # Conv1D keeps (in, out); norm weights are vectors and pass through.
            hf[f"{theirs}{dst}.weight"] = weight.t().contiguous() if weight.dim() == 2 else weight
            hf[f"{theirs}{dst}.bias"] = state[f"{ours}{src}.bias"]
        qkv = [f"{ours}self_attn.{p}_proj" for p in "qkv"]
        hf[f"{theirs}attn.c_attn.weight"] = torch.cat([state[f"{n}.weight"] for n in qkv]).t().contiguous()
        hf[f"{theirs}attn.c_attn.bias"] = torch.cat([state[f"{n}.bias"] for n in qkv])
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = state["lm_head.weight"]
    return hf


def _gpt2_from_hf(cfg: ModelConfig, hf: State) -> State:
    state = {
        "embed_tokens.weight": hf["transformer.wte.weight"],
        "embed_positions.weight": hf["transformer.wpe.weight"],
        "norm.weight": hf["transformer.ln_f.weight"],
        "norm.bias": hf["transformer.ln_f.bias"],
    }
    assert cfg.num_kv_heads is not None  # filled in by ModelConfig.__post_init__
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for dst, src in _GPT2_LAYER.items():
            weight = hf[f"{theirs}{src}.weight"]
            state[f"{ours}{dst}.weight"] = weight.t().contiguous() if weight.dim() == 2 else weight
            state[f"{ours}{dst}.bias"] = hf[f"{theirs}{src}.bias"]
        sizes = [q_out, kv_out, kv_out]
        weights = hf[f"{theirs}attn.c_attn.weight"].t().split(sizes)  # (3h, h) -> q, k, v rows
        biases = hf[f"{theirs}attn.c_attn.bias"].split(sizes)
        for p, w, b in zip("qkv", weights, biases, strict=True):
            state[f"{ours}self_attn.{p}_proj.weight"] = w.contiguous()
            state[f"{ours}self_attn.{p}_proj.bias"] = b.contiguous()
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = hf["lm_head.weight"]
    return state


_CONVERT_TO_HF: dict[str, Callable[[ModelConfig, State], State]] = {
    "llama": _llama_to_hf,
    "gpt2": _gpt2_to_hf,
}
_CONVERT_FROM_HF: dict[str, Callable[[ModelConfig, State], State]] = {
    "llama": _llama_from_hf,
    "gpt2": _gpt2_from_hf,
}


def to_hf_state_dict(cfg: ModelConfig, state: State) -> State:
    """threefold full state dict -> HF names and layouts (tensors are shared where no copy is needed)."""
    check_arch(cfg)
    _check_state(threefold_shapes(cfg), state, "threefold state dict")
    return _CONVERT_TO_HF[cfg.arch](cfg, state)


def from_hf_state_dict(cfg: ModelConfig, hf_state: State) -> State:
    """HF Llama / Qwen2 / Mistral / GPT2LMHeadModel state dict -> threefold full state dict.

    Derived buffers (causal masks, RoPE frequencies) are dropped. A tied `lm_head.weight`, which
    `model.state_dict()` lists but checkpoints omit, is accepted only if it equals the embedding.
    """
    check_arch(cfg)
    hf = {k: v for k, v in hf_state.items() if not _HF_BUFFERS[cfg.arch].search(k)}
    if cfg.arch == "gpt2" and hf and not any(k.startswith("transformer.") for k in hf):
        hf = {f"transformer.{k}": v for k, v in hf.items()}  # saved from GPT2Model, e.g. the original gpt2
    if cfg.tie_embeddings and "lm_head.weight" in hf:
        head = hf.pop("lm_head.weight")
        embed = hf.get("model.embed_tokens.weight" if cfg.arch == "llama" else "transformer.wte.weight")
        if embed is not None and (head.shape != embed.shape or not torch.equal(head, embed)):
            raise ValueError(
                "tie_word_embeddings is true but lm_head.weight differs from the token embedding; "
                "load it with tie_word_embeddings = false"
            )
    _check_state(hf_shapes(cfg), hf, f"Hugging Face {cfg.arch} state dict")
    return _CONVERT_FROM_HF[cfg.arch](cfg, hf)


# ----------------------------------------------------------------------------------------- checkpoints


def _shard(tensors: State, max_shard_bytes: int) -> list[State]:
    """Split tensors, in name order, into groups of at most max_shard_bytes (a bigger tensor goes alone)."""
    shards: list[State] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards


def save_hf_checkpoint(
    cfg: ModelConfig,
    state: State,
    out_dir: str | Path,
    *,
    eos_token_id: int | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    keep: Sequence[str | Path] = (),
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write `config.json` and the weights, loadable by `AutoModelForCausalLM.from_pretrained`, and the
    `extra_files` (name -> text: the tokenizer's files).

    Weights over `max_shard_bytes` are split into `model-0000i-of-0000n.safetensors` files with a
    `model.safetensors.index.json`, as Hugging Face does for large models. `out_dir` must be absent or
    empty unless `overwrite`, and never holds one of the `keep` paths (the checkpoint exported). The
    directory appears complete or not at all: files go to a sibling temporary directory that is fsynced
    and renamed into place.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out = Path(out_dir)
    check_output_dir(out, overwrite=overwrite, keep=list(keep))
    tensors = {k: v.detach().cpu().contiguous() for k, v in to_hf_state_dict(cfg, state).items()}
    config = hf_config(cfg, eos_token_id=eos_token_id)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:
        config["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    with staged_dir(out) as tmp:
        shards = _shard(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        else:
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards, start=1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / file, metadata={"format": "pt"})
                weight_map |= dict.fromkeys(shard, file)
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            inside(tmp, name, what="extra file").write_text(text, encoding="utf-8")
    return out


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(file)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(file)!r} holds {type(data).__name__}, expected a JSON object")
    return data


def _weights_file(path: Path, name: str) -> Path:
    """`path / name`, refused unless it stays inside `path` (`files.inside`).

    One exception: a snapshot of the Hugging Face hub cache (`models--org--name/snapshots/<revision>`)
    holds symlinks into the repository's `blobs/`, so there a link may resolve anywhere inside
    `models--org--name`; names themselves still may not be absolute or hold `..`.
    """
    try:
        return inside(path, name, what="weights file")
    except ValueError:
        snapshots = path.parent
        hub = snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--")
        if not hub or not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise
        inside(snapshots.parent, str(Path("snapshots", path.name, name)), what="weights file")
        return path / name


def _load_weights(file: Path) -> State:
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own SafetensorError for a corrupt header
        raise ValueError(f"{str(file)!r} is not a readable safetensors file ({e})") from None


def _shard_names(path: Path) -> list[str]:
    """The weight files an index names, checked to be a map of tensor name -> file name."""
    index = _read_json(path / INDEX_NAME)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{str(path / INDEX_NAME)!r} has no 'weight_map' object of tensor name -> file name")
    return sorted(set(weight_map.values()))


def load_hf_checkpoint(path: str | Path) -> tuple[ModelConfig, State]:
    """Read an HF checkpoint directory (single or sharded safetensors) as (ModelConfig, full state).

    Every file name an index holds is resolved inside the directory (`_weights_file`) before anything is
    opened; a malformed config.json, index or safetensors header is a ValueError naming the file.
    """
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise ValueError(f"{str(path)!r} is not a Hugging Face checkpoint: no {CONFIG_NAME}")
    try:
        cfg = model_config_from_hf(_read_json(config_file))
    except ValueError as e:
        message = str(e)
        raise ValueError(message if str(config_file) in message else f"{str(config_file)!r}: {e}") from None
    if (path / WEIGHTS_NAME).is_file():
        files = [_weights_file(path, WEIGHTS_NAME)]
    elif (path / INDEX_NAME).is_file():
        files = [_weights_file(path, name) for name in _shard_names(path)]
    else:
        raise ValueError(f"{str(path)!r} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    hf_state: State = {}
    for file in files:
        hf_state.update(_load_weights(file))
    return cfg, from_hf_state_dict(cfg, hf_state)
