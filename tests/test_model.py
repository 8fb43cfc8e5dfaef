"""Model construction: parameter counts, identical initialization across tp, and the shape contract."""

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks

from threefold.config import ModelConfig
from threefold.metrics import count_parameters
from threefold.model.transformer import build_model
from threefold.parallel.layers import TPContext, gather_full

CONFIGS = {
    "llama-untied": ModelConfig(
        arch="llama",
        vocab_size=101,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=48,
        max_seq_len=16,
    ),
    "llama-tied": ModelConfig(
        arch="llama",
        vocab_size=101,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=48,
        max_seq_len=16,
        tie_embeddings=True,
    ),
    "gpt2": ModelConfig(
        arch="gpt2",
        vocab_size=101,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        max_seq_len=16,
        tie_embeddings=True,
    ),
}


def _build(rank: int, world: int, cfg: ModelConfig) -> dict:
    model = build_model(cfg, TPContext(dist.group.WORLD), seed=3)
    full = {n: gather_full(p, dist.group.WORLD) for n, p in model.named_parameters()}
    return {"numel": sum(t.numel() for t in full.values()), "full": full}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_matches_the_flops_model(name):
    cfg = CONFIGS[name]
    got = run_ranks(1, _build, cfg)[0]
    assert got["numel"] == count_parameters(cfg)["total"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_initialization_is_identical_for_every_tp(name):
    cfg = CONFIGS[name]
    ref = run_ranks(1, _build, cfg)[0]["full"]
    for tp in (2, 4):
        for rank_result in run_ranks(tp, _build, cfg):
            assert rank_result["full"].keys() == ref.keys()
            for key, value in ref.items():
                assert torch.equal(rank_result["full"][key], value), f"tp={tp}: {key}"
