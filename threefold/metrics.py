"""Parameter counts, FLOPs per token and model-FLOPs utilization (MFU). Pure functions, no torch.

The convention (BENCHMARKS.md), printed next to every figure:
    model FLOPs per token = 6 * N + 12 * l * h * s
where N counts every parameter except the input embedding (the output projection counts, even when it
shares its weight with the embedding), l is the number of layers, h the hidden size and s the sequence
length. The 6 is 2 FLOPs per multiply-add times 3 (forward, plus backward to activations and to weights);
12 * l * h * s is the attention score and value matmuls over the full s x s square (no causal saving,
no recomputation). MFU = achieved model FLOP/s per device / the device's dense bf16 peak.
"""

from __future__ import annotations

import math

from threefold.config import ModelConfig


def local_vocab_size(vocab_size: int, tp_size: int = 1) -> int:
    """Vocabulary rows one tensor-parallel rank holds: V padded to a multiple of tp_size, divided by it."""
    return math.ceil(vocab_size / tp_size)


def local_kv_heads(num_kv_heads: int, tp_size: int = 1) -> int:
    """Key/value heads one tensor-parallel rank holds: num_kv_heads / tp_size, or 1 when tp_size exceeds
    num_kv_heads (each kv head is then replicated over tp_size / num_kv_heads ranks)."""
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(
            f"tp_size ({tp_size}) must divide model.num_kv_heads ({num_kv_heads}) or be a multiple of it"
        )
    return max(1, num_kv_heads // tp_size)


def count_parameters(cfg: ModelConfig, *, tp_size: int = 1) -> dict[str, int]:
    """Analytic parameter counts of the model as threefold builds it: the whole model when tp_size is 1
    (vocabulary not padded), else what one tensor-parallel rank holds: every column- or row-parallel weight
    and the biases split with it 1/tp_size, the vocabulary padded to a multiple of tp_size; norms, the
    row-parallel layers' biases and gpt2's position table are replicated; the k and v projections hold
    `local_kv_heads` heads (one, replicated, when tp_size exceeds num_kv_heads).

    Keys:
      per_layer        one transformer layer (attention, MLP, its two norms)
      layers           num_layers * per_layer
      final_norm       the norm after the last layer
      input_embedding  token table V*h, plus the learned position table max_seq_len*h for gpt2
      output_weight    the output projection's weight V*h, whether it is its own or the embedding's
      output           parameters the output projection owns: output_weight when untied, 0 when tied
      non_embedding    layers + final_norm (neither embedding nor output projection)
      flops_params     N of the FLOPs convention: non_embedding + output_weight, tied or not, because the
                       logits matmul is computed either way
      total            unique parameters: input_embedding + non_embedding + output
    """
    h, ffn, t = cfg.hidden_size, cfg.ffn_hidden_size, tp_size
    assert ffn is not None and cfg.num_kv_heads is not None  # filled in by ModelConfig.__post_init__
    split = {"num_heads": cfg.num_heads, "ffn_hidden_size": ffn}
    for name, size in split.items():
        if size % t:
            raise ValueError(f"tp_size ({t}) must divide model.{name} ({size})")
    q_width = cfg.num_heads * cfg.head_dim
    if cfg.arch == "llama":
        kv_width = local_kv_heads(cfg.num_kv_heads, t) * cfg.head_dim  # this rank's
        attention = 2 * h * q_width // t + 2 * h * kv_width  # q, o weights; k, v weights
        if cfg.attention_bias:
            attention += q_width // t + 2 * kv_width  # q, k, v biases (Qwen2); o has none
        mlp = 3 * h * ffn // t  # gate, up, down
        norms = 2 * h  # two RMSNorm weights
        final_norm = h
        positions = 0
    elif cfg.arch == "gpt2":
        # gpt2 has no grouped-query attention: k and v are as wide as q.
        # q, k, v, o weights and q, k, v biases split; o's bias replicated (the row-parallel output's)
        attention = (4 * (h * q_width) + 3 * q_width) // t + h
        mlp = (2 * h * ffn + ffn) // t + h  # c_fc and c_proj, each with its bias (c_proj's replicated)
        norms = 2 * 2 * h  # two LayerNorms, weight and bias each
        final_norm = 2 * h
        positions = cfg.max_seq_len * h
    else:
        raise ValueError(f"model.arch {cfg.arch!r} is unknown; choose 'llama' or 'gpt2'")

    per_layer = attention + mlp + norms
    layers = cfg.num_layers * per_layer
    vocab_table = local_vocab_size(cfg.vocab_size, t) * h  # the token table's shape and the output weight's
    input_embedding = vocab_table + positions
    output = 0 if cfg.tie_embeddings else vocab_table
    non_embedding = layers + final_norm
    return {
        "per_layer": per_layer,
        "layers": layers,
        "final_norm": final_norm,
        "input_embedding": input_embedding,
        "output_weight": vocab_table,
        "output": output,
        "non_embedding": non_embedding,
        "flops_params": non_embedding + vocab_table,
        "total": input_embedding + non_embedding + output,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs to train on one token: 6 * N + 12 * l * h * s (see the module docstring).

    Counts forward and backward once each; activation recomputation is not model work, so it is left out.
    """
    n = count_parameters(cfg)["flops_params"]
    return float(6 * n + 12 * cfg.num_layers * cfg.hidden_size * seq_len)


def paper_flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int, recompute: bool) -> float:
    """The Megatron-LM PTD-P paper's FLOPs per training step, for comparison with `flops_per_token`.

    For B sequences of length s through l layers of width h and a vocabulary V:
      without recomputation: 72 * B*s*l*h^2 * (1 + s/(6h) + V/(12*l*h))   (3 x the forward pass)
      with full recomputation: 96 * B*s*l*h^2 * (1 + s/(6h) + V/(16*l*h)) (one more forward of the layers,
                               not of the output layer)
    The formula assumes a GPT block: multi-head attention (no GQA) and a 4h MLP, and it drops biases and
    norms (about 13/(12h) of the layer parameters). For other shapes it is only a rough figure; use
    `flops_per_token`, which counts the matmuls of the actual shape.
    """
    b, s, num_layers, h, v = batch_size, seq_len, cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    if recompute:
        return 96.0 * b * s * num_layers * h * h * (1 + s / (6 * h) + v / (16 * num_layers * h))
    return 72.0 * b * s * num_layers * h * h * (1 + s / (6 * h) + v / (12 * num_layers * h))


GPU_PEAK_BF16_FLOPS: dict[str, float] = {
    "h100-pcie": 756e12,
    "h100-nvl": 835e12,
    "h200-nvl": 835e12,
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "b200": 2250e12,
}
"""The one table of GPU peaks: dense (no 2:4 sparsity) bf16 tensor-core FLOP/s from NVIDIA's datasheets
(half the with-sparsity figure, rounded down), by the words of a device name joined with '-'.

It lives here, in the spine, because training reports MFU against it (report.py, bench.py) and must not
import threefold.plan; the planner's hardware presets read their `peak_tflops` from it. The form factor
matters for Hopper: PCIe and NVL cards run at lower clocks and power than SXM. `peak_flops` checks the
entries in order, so the more specific names come first; a GH200 matches "h200" and gets the SXM figure,
which is what its Hopper die is rated at."""


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU named like `torch.cuda.get_device_name()`, or None if unknown.

    "NVIDIA H100 80GB HBM3" and "NVIDIA H200" (SXM) give 989e12; A100 (SXM or PCIe) gives 312e12.
    A CPU or an unlisted GPU gives None, and MFU is then not reported rather than guessed.
    """
    name = device_name.lower()
    for key, peak in GPU_PEAK_BF16_FLOPS.items():
        if all(word in name for word in key.split("-")):
            return peak
    return None


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model-FLOPs utilization as a fraction (0.455 means 45.5%), or None when the peak is unknown."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s_per_device * flops_per_token / peak
