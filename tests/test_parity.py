"""Whole-model parity: every (tp, dp) layout, with and without sequence parallelism, reproduces the
losses and final weights of one process training the same model on the same global batches."""

import pytest
from distributed import assert_trains_like, train_merged
from tiny import tiny_config, wide_model

STEPS = 5


@pytest.fixture(scope="module")
def config(sonnets_dataset, tmp_path_factory):
    """config(arch, tp, dp, **parallel): the tiny model of `arch` under a (tp, dp) layout, 5 steps."""
    run = tmp_path_factory.mktemp("parity")

    def layout(arch: str, tp: int = 1, dp: int = 1, **parallel):
        return tiny_config(
            sonnets_dataset, run, tp=tp, dp=dp, zero=parallel.pop("zero", False),
            model=wide_model(arch), parallel=parallel, optimizer=dict(warmup_steps=2),
            training=dict(max_steps=STEPS, seed=7),
        )  # fmt: skip

    return layout


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
def test_layout_matches_single_process(config, reference, arch, tp, dp, sp, zero):
    got = train_merged(config(arch, tp, dp, sequence_parallel=sp, zero=zero))
    assert_trains_like(got, reference(config(arch)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tp_without_comm_overlap_matches_single_process(config, reference, arch):
    """parallel.overlap_tp_comm = false: the f operator all-reduces after the projections' backward."""
    assert_trains_like(train_merged(config(arch, 2, overlap_tp_comm=False)), reference(config(arch)))
