"""Pipeline parallelism composed with tp and dp: every layout and schedule reproduces one process's
losses and final weights over 3 float32 steps, with and without activation recomputation."""

from pathlib import Path

import pytest
import torch
from distributed import run_ranks, train_and_gather

from threefold.config import build_config
from threefold.pipeline.partition import chunk_layer_ranges

STEPS = 3


@pytest.fixture(scope="module")
def dataset(sonnets_dataset) -> str:
    return str(sonnets_dataset)


def _config(data_path: str, arch: str, tp=1, pp=1, dp=1, v=1, schedule="1f1b", **extra):
    parallel = dict(tp_size=tp, pp_size=pp, dp_size=dp, num_model_chunks=v, pipeline_schedule=schedule)
    parallel |= {k: extra.pop(k) for k in ("sequence_parallel", "scatter_gather", "zero") if k in extra}
    return build_config(
        {
            "model": dict(
                arch=arch, vocab_size=50257, hidden_size=32, num_layers=8, num_heads=8,
                num_kv_heads=4 if arch == "llama" else 8, ffn_hidden_size=64, max_seq_len=32,
                tie_embeddings=arch == "gpt2",
            ),
            "parallel": parallel,
            "data": dict(path=data_path, seq_len=16),
            # eps 1e-6: Adam would turn a 1e-9 rounding difference in a near-zero gradient into a full
            # lr-sized step; the layouts' gradients agree to ~1e-7, which is what these tests are about.
            "optimizer": dict(lr=2e-3, min_lr=2e-4, warmup_steps=1, grad_clip=0.5, eps=1e-6),
            "training": dict(max_steps=STEPS, global_batch_size=16, micro_batch_size=2, eval_interval=2,
                             eval_batches=4, dtype="float32", seed=11) | extra,
            "logging": dict(progress=False, tensorboard=False, plot=False,
                            out_dir=str(Path(data_path) / "run")),
        }
    )  # fmt: skip


_train = train_and_gather


_references: dict = {}


def _reference(dataset: str, arch: str) -> dict:
    if arch not in _references:
        _references[arch] = run_ranks(1, _train, _config(dataset, arch))[0]
    return _references[arch]


def _check(dataset: str, arch: str, config) -> None:
    ref = _reference(dataset, arch)
    results = run_ranks(config.world_size, _train, config, timeout=240)
    merged = {}
    for r in results:
        merged |= r["weights"]
        # Every rank reports the same global loss (it lives on the last stage and is shared).
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
        assert r["val"].keys() == ref["val"].keys()
        val, ref_val = torch.tensor(list(r["val"].values())), torch.tensor(list(ref["val"].values()))
        torch.testing.assert_close(val, ref_val, rtol=1e-5, atol=0)
    got = results[0]
    assert ref["losses"][-1] < ref["losses"][0]
    torch.testing.assert_close(got["norms"][0], ref["norms"][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref["norms"]), rtol=1e-5, atol=0)
    assert merged.keys() == ref["weights"].keys()
    for name, ref_w in ref["weights"].items():
        torch.testing.assert_close(merged[name], ref_w, rtol=1e-5, atol=1e-5, msg=name)


LAYOUTS = [(1, 2, 1, 1), (1, 4, 1, 1), (1, 2, 1, 2), (1, 4, 1, 2), (2, 2, 1, 1), (2, 2, 1, 2), (1, 2, 2, 1),
           (2, 2, 2, 2)]  # fmt: skip
CASES = [
    (layout, s)
    for layout in LAYOUTS
    for s in (("gpipe", "1f1b") if layout[3] == 1 else ("gpipe", "interleaved"))
]


@pytest.mark.parametrize("layout,schedule", CASES, ids=[f"t{t}p{p}d{d}v{v}-{s}" for (t, p, d, v), s in CASES])
def test_pipeline_matches_single_process(dataset, layout, schedule):
    tp, pp, dp, v = layout
    _check(dataset, "llama", _config(dataset, "llama", tp, pp, dp, v, schedule))


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
def test_pipeline_options_match_single_process(dataset, layout, schedule, extra):
    tp, pp, dp, v = layout
    _check(dataset, "llama", _config(dataset, "llama", tp, pp, dp, v, schedule, **extra))


@pytest.mark.parametrize(
    "layout,schedule,zero",
    [((1, 2, 1, 1), "1f1b", False), ((2, 2, 1, 2), "interleaved", False), ((1, 2, 2, 1), "1f1b", True)],
)
def test_tied_embeddings_across_stages(dataset, layout, schedule, zero):
    """With ZeRO the tied weight's gradient is summed over stages and reduce-scattered over dp."""
    tp, pp, dp, v = layout
    _check(dataset, "gpt2", _config(dataset, "gpt2", tp, pp, dp, v, schedule, zero=zero))


def _recompute_single(rank: int, world: int, config) -> list[float]:
    return _train(rank, world, config)["losses"]


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recomputation_is_numerically_identical(dataset, mode):
    base = run_ranks(1, _recompute_single, _config(dataset, "llama"))[0]
    again = run_ranks(1, _recompute_single, _config(dataset, "llama", recompute=mode))[0]
    assert again == base  # bit for bit: the same kernels run again on the same inputs


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
        result = _train(rank, world, config)
    finally:
        pipeline._free = original
    return {"freed": freed, "losses": result["losses"]}


def test_executor_frees_each_sent_activation(dataset):
    config = _config(dataset, "llama", pp=2, schedule="1f1b")
    results = run_ranks(2, _count_frees, config)
    m = config.num_microbatches
    # Rank 0 sends every micro-batch's activation once per step; the last stage sends none.
    assert results[0]["freed"] == [1] * (m * STEPS), "each sent activation keeps only a 1-element placeholder"
    assert results[1]["freed"] == []


def test_eval_interval_zero_runs_no_evaluation(dataset):
    result = run_ranks(1, _train, _config(dataset, "llama", eval_interval=0))[0]
    assert result["val"] == {} and len(result["losses"]) == STEPS
