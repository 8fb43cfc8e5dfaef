"""Whole-model parity: every (tp, dp) layout, with and without sequence parallelism, reproduces the
losses and final weights of one process training the same model on the same global batches."""

from pathlib import Path

import pytest
import torch
from distributed import run_ranks, train_and_gather

from threefold.config import build_config

STEPS = 5


@pytest.fixture(scope="module")
def dataset(sonnets_dataset) -> str:
    return str(sonnets_dataset)


def _config(
    data_path: str,
    arch: str,
    tp: int,
    dp: int,
    sequence_parallel: bool,
    zero: bool = False,
    overlap_tp_comm: bool = True,
):
    return build_config(
        {
            "model": dict(
                arch=arch,
                vocab_size=50257,
                hidden_size=32,
                num_layers=2,
                num_heads=8,
                num_kv_heads=4 if arch == "llama" else 8,
                ffn_hidden_size=64,
                max_seq_len=32,
                tie_embeddings=arch == "gpt2",
            ),
            "parallel": dict(
                tp_size=tp,
                dp_size=dp,
                sequence_parallel=sequence_parallel,
                zero=zero,
                overlap_tp_comm=overlap_tp_comm,
            ),
            "data": dict(path=data_path, seq_len=16),
            # eps 1e-6: Adam would turn a 1e-9 rounding difference in a near-zero gradient into a full
            # lr-sized step; the layouts' gradients agree to ~1e-7, which is what these tests are about.
            "optimizer": dict(lr=2e-3, min_lr=2e-4, warmup_steps=2, grad_clip=0.5, eps=1e-6),
            "training": dict(
                max_steps=STEPS,
                global_batch_size=8,
                micro_batch_size=2,
                eval_interval=0,
                eval_batches=4,
                dtype="float32",
                seed=7,
            ),
            "logging": dict(
                progress=False, tensorboard=False, plot=False, out_dir=str(Path(data_path) / "run")
            ),
        }
    )


_train = train_and_gather


_reference_cache: dict = {}


def _reference(dataset: str, arch: str) -> dict:
    if arch not in _reference_cache:
        _reference_cache[arch] = run_ranks(1, _train, _config(dataset, arch, 1, 1, False))[0]
    return _reference_cache[arch]


LAYOUTS = [
    (1, 1, False, False),
    (2, 1, False, False),
    (1, 2, False, False),
    (2, 2, False, False),
    (4, 1, False, False),
    (2, 1, True, False),
    (2, 2, True, False),
    (4, 1, True, False),
    (1, 2, False, True),
    (1, 4, False, True),
    (2, 2, True, True),
]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "tp,dp,sp,zero",
    LAYOUTS,
    ids=[f"tp{t}-dp{d}{'-sp' if s else ''}{'-zero' if z else ''}" for t, d, s, z in LAYOUTS],
)
def test_layout_matches_single_process(dataset, arch, tp, dp, sp, zero):
    _check_against_reference(
        dataset, arch, run_ranks(tp * dp, _train, _config(dataset, arch, tp, dp, sp, zero))[0]
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tp_without_comm_overlap_matches_single_process(dataset, arch):
    """parallel.overlap_tp_comm = false: the f operator all-reduces after the projections' backward."""
    config = _config(dataset, arch, 2, 1, False, overlap_tp_comm=False)
    _check_against_reference(dataset, arch, run_ranks(2, _train, config)[0])


def _check_against_reference(dataset: str, arch: str, got: dict) -> None:
    ref = _reference(dataset, arch)
    assert len(got["losses"]) == STEPS
    assert ref["losses"][-1] < ref["losses"][0], "training must make progress for the comparison to mean much"
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    # Step 0's norm sees identical weights: a replicated parameter counted twice would show here.
    torch.testing.assert_close(got["norms"][0], ref["norms"][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref["norms"]), rtol=1e-5, atol=0)
    assert got["weights"].keys() == ref["weights"].keys()
    for name, ref_w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], ref_w, rtol=1e-5, atol=1e-5, msg=name)
