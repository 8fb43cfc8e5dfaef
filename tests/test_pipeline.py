"""Pipeline parallelism composed with tp and dp: every layout and schedule reproduces one process's
losses and final weights over 3 float32 steps, with and without activation recomputation."""

import pytest
from distributed import assert_trains_like, run_ranks, train_and_gather, train_merged
from tiny import tiny_config, wide_model

from threefold.pipeline.partition import chunk_layer_ranges

STEPS = 3


@pytest.fixture(scope="module")
def config(sonnets_dataset, tmp_path_factory):
    """config(arch, tp, pp, dp, v, schedule, **extra): the 8-layer tiny model of `arch` under a layout, 3
    steps; `extra` sets parallel options (sequence_parallel, scatter_gather, zero) and training ones."""
    run = tmp_path_factory.mktemp("pipeline")

    def layout(arch: str, tp=1, pp=1, dp=1, v=1, schedule="1f1b", **extra):
        parallel = {k: extra.pop(k) for k in ("sequence_parallel", "scatter_gather") if k in extra}
        return tiny_config(
            sonnets_dataset, run, tp=tp, pp=pp, dp=dp, v=v, zero=extra.pop("zero", False),
            model=wide_model(arch) | dict(num_layers=8),
            parallel=parallel | dict(pipeline_schedule=schedule),
            training=dict(max_steps=STEPS, global_batch_size=16, eval_interval=2, seed=11) | extra,
        )  # fmt: skip

    return layout


LAYOUTS = [(1, 2, 1, 1), (1, 4, 1, 1), (1, 2, 1, 2), (1, 4, 1, 2), (2, 2, 1, 1), (2, 2, 1, 2), (1, 2, 2, 1),
           (2, 2, 2, 2)]  # fmt: skip
CASES = [
    (layout, s)
    for layout in LAYOUTS
    for s in (("gpipe", "1f1b") if layout[3] == 1 else ("gpipe", "interleaved"))
]


@pytest.mark.parametrize("layout,schedule", CASES, ids=[f"t{t}p{p}d{d}v{v}-{s}" for (t, p, d, v), s in CASES])
def test_pipeline_matches_single_process(config, reference, layout, schedule):
    assert_trains_like(train_merged(config("llama", *layout, schedule)), reference(config("llama")))


@pytest.mark.parametrize(
    "layout,schedule,extra",
    [
        ((1, 2, 1, 1), "1f1b", dict(recompute="selective")),
        ((1, 2, 1, 1), "1f1b", dict(recompute="full")),
        ((2, 2, 1, 2), "interleaved", dict(recompute="full")),
        ((2, 2, 1, 2), "interleaved", dict(recompute="selective", sequence_parallel=True)),
        ((2, 2, 2, 2), "interleaved", dict(sequence_parallel=True)),
        ((2, 2, 1, 1), "1f1b", dict(scatter_gather=False)),
        ((1, 2, 2, 2), "interleaved", dict(zero=True)),
        ((2, 2, 2, 1), "1f1b", dict(zero=True, sequence_parallel=True)),
    ],
    ids=[
        "selective",
        "full",
        "full-tp2-v2",
        "selective-sp",
        "sp-2x2x2x2",
        "no-scatter-gather",
        "zero-p2d2v2",
        "zero-sp-2x2x2",
    ],
)
def test_pipeline_options_match_single_process(config, reference, layout, schedule, extra):
    assert_trains_like(train_merged(config("llama", *layout, schedule, **extra)), reference(config("llama")))


@pytest.mark.parametrize(
    "layout,schedule,zero",
    [((1, 2, 1, 1), "1f1b", False), ((2, 2, 1, 2), "interleaved", False), ((1, 2, 2, 1), "1f1b", True)],
)
def test_tied_embeddings_across_stages(config, reference, layout, schedule, zero):
    """With ZeRO the tied weight's gradient is summed over stages and reduce-scattered over dp."""
    assert_trains_like(train_merged(config("gpt2", *layout, schedule, zero=zero)), reference(config("gpt2")))


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recomputation_is_numerically_identical(config, reference, mode):
    again = run_ranks(1, train_and_gather, config("llama", recompute=mode))[0]
    # bit for bit: the same kernels run again on the same inputs
    assert again["losses"] == reference(config("llama"))["losses"]


@pytest.mark.parametrize(
    "layers,pp,v,sizes",
    [
        (8, 2, 1, [4, 4]),
        (10, 4, 1, [2, 3, 3, 2]),
        (9, 2, 2, [2, 3, 2, 2]),
        (7, 3, 1, [2, 3, 2]),
        (5, 1, 1, [5]),
    ],
)
def test_partition_rule(layers, pp, v, sizes):
    ranges = chunk_layer_ranges(layers, pp, v)
    assert [b - a for a, b in ranges] == sizes
    assert ranges[0][0] == 0 and ranges[-1][1] == layers
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))


def test_partition_refuses_too_many_chunks():
    with pytest.raises(
        ValueError, match=r"cannot split 6 layers over pp_size \(4\) \* num_model_chunks \(2\) = 8"
    ):
        chunk_layer_ranges(6, 4, 2)


def _count_frees(rank: int, world: int, config) -> dict:
    import threefold.pipeline.executor as pipeline

    freed = []
    original = pipeline._free

    def recording_free(t):
        original(t)
        freed.append(t.numel())

    pipeline._free = recording_free
    try:
        result = train_and_gather(rank, world, config)
    finally:
        pipeline._free = original
    return {"freed": freed, "losses": result["losses"]}


def test_executor_frees_each_sent_activation(config):
    two_stages = config("llama", pp=2, schedule="1f1b")
    results = run_ranks(2, _count_frees, two_stages)
    m = two_stages.num_microbatches
    # Rank 0 sends every micro-batch's activation once per step; the last stage sends none.
    assert results[0]["freed"] == [1] * (m * STEPS), "each sent activation keeps only a 1-element placeholder"
    assert results[1]["freed"] == []


def test_eval_interval_zero_runs_no_evaluation(config):
    result = run_ranks(1, train_and_gather, config("llama", eval_interval=0))[0]
    assert result["val"] == {} and len(result["losses"]) == STEPS
