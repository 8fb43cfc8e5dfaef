"""Validation counted in sequences: every layout scores the same sequences, so the validation losses
agree with one process to float rounding even when the ranks' shares and micro-batches are uneven."""

import pytest
import torch
from distributed import run_ranks, train_and_gather
from tiny import tiny_config, wide_model

SEQUENCES = 7  # divisible by no dp size or micro-batch size below: shares and last micro-batches are uneven


def _config(dataset, run, *, tp=1, pp=1, dp=1, micro_batch_size=1, **parallel):
    return tiny_config(
        dataset, run, tp=tp, pp=pp, dp=dp, model=wide_model("llama"), parallel=parallel,
        training=dict(max_steps=2, seed=3, global_batch_size=24, micro_batch_size=micro_batch_size,
                      eval_interval=1, eval_sequences=SEQUENCES),
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(sonnets_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval-ref")
    return run_ranks(1, train_and_gather, _config(sonnets_dataset, run))[0]


LAYOUTS = [
    dict(micro_batch_size=3),  # 7 = 3 + 3 + 1
    dict(dp=2, micro_batch_size=3),  # shares 3 and 4
    dict(dp=4, micro_batch_size=2),  # shares 1, 2, 2, 2
    dict(pp=2, micro_batch_size=2),  # the last micro-batch of one sequence crosses the stage boundary
    dict(tp=2, pp=2, micro_batch_size=6, sequence_parallel=True),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_validation_loss_is_the_same_in_every_layout(sonnets_dataset, tmp_path, reference, layout):
    world = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("dp", 1)
    got = run_ranks(world, train_and_gather, _config(sonnets_dataset, tmp_path, **layout))
    assert sorted(reference["val"]) == [0, 1, 2]
    for rank_result in got:
        if rank_result["val"]:  # every rank returns the same figure; check all that report one
            for step, loss in reference["val"].items():
                torch.testing.assert_close(rank_result["val"][step], loss, rtol=1e-5, atol=0, msg=str(step))
