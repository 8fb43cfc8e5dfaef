"""Model presets: the CPU demo, the benchmark models (BENCHMARKS.md), the paper family (SYSTEM.md)."""

from __future__ import annotations

from typing import Any

GPT2_VOCAB = 50257
LLAMA3_VOCAB = 128256
PAPER_VOCAB = 51200

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to train on a 2-core laptop in minutes with the GPT-2 tokenizer.
    "tiny": dict(
        arch="llama",
        vocab_size=GPT2_VOCAB,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=384,
        max_seq_len=256,
        rope_theta=10000.0,
        tie_embeddings=True,
    ),
    "gpt2-124m": dict(
        arch="gpt2",
        vocab_size=GPT2_VOCAB,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        ffn_hidden_size=3072,
        max_seq_len=1024,
        tie_embeddings=True,
    ),
    "llama-1b": dict(
        arch="llama",
        vocab_size=LLAMA3_VOCAB,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=8192,
        max_seq_len=2048,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
    "llama-8b": dict(
        arch="llama",
        vocab_size=LLAMA3_VOCAB,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=14336,
        max_seq_len=4096,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
}

# The paper's weak-scaling family: GeLU MLP 4h, learned positions, seq 2048, vocab 51200.
# (name, heads, hidden, layers); the t/p/GPU/batch columns of SYSTEM.md belong to the planner.
_PAPER_FAMILY = [
    ("gpt3-1.7b", 24, 2304, 24),
    ("gpt3-3.6b", 32, 3072, 30),
    ("gpt3-7.5b", 32, 4096, 36),
    ("gpt3-18b", 48, 6144, 40),
    ("gpt3-39b", 64, 8192, 48),
    ("gpt3-76b", 80, 10240, 60),
    ("gpt3-145b", 96, 12288, 80),
    ("gpt3-310b", 128, 16384, 96),
    ("gpt3-530b", 128, 20480, 105),
    ("gpt3-1t", 160, 25600, 128),
]
for _name, _heads, _hidden, _layers in _PAPER_FAMILY:
    MODEL_PRESETS[_name] = dict(
        arch="gpt2",
        vocab_size=PAPER_VOCAB,
        hidden_size=_hidden,
        num_layers=_layers,
        num_heads=_heads,
        num_kv_heads=_heads,
        ffn_hidden_size=4 * _hidden,
        max_seq_len=2048,
        tie_embeddings=True,
    )
