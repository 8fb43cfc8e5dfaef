"""The planner's time model against published and measured throughput (threefold/plan/validation.json), and
the term-by-term breakdown `threefold plan --explain` prints."""

from __future__ import annotations

import dataclasses

import pytest

from threefold.cli import main
from threefold.config import ModelConfig
from threefold.plan.hardware import PRESETS
from threefold.plan.layout import Layout, Workload
from threefold.plan.time_model import Kernels, estimate_layout_time
from threefold.plan.validate import counted, load_rows, predict_row, summary, validate
from threefold.presets import MODEL_PRESETS

MAX_MEAN_ABS_ERROR = 0.10
MAX_ABS_ERROR = 0.20


@pytest.fixture(scope="module")
def predictions():
    return validate()


def test_validation_error_within_bounds(predictions):
    """The issue's target: mean |error| <= 10%, none worse than 20%, over >= 20 rows from >= 3 sources."""
    rows = counted(predictions)
    assert len(rows) >= 20 and len({p.row["source"] for p in rows}) >= 3
    s = summary(predictions)
    worst = max(rows, key=lambda p: abs(p.error))
    assert s["mean_abs_error"] <= MAX_MEAN_ABS_ERROR, s
    assert s["max_abs_error"] <= MAX_ABS_ERROR, (worst.row["id"], worst.error)


def test_every_row_names_a_cited_source():
    sources, rows = load_rows()
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["source"] in sources, r["id"]
        assert len(r["reported"]) >= 1 and all(v > 0 for v in r["reported"].values())
    assert all(src["cite"] and src["url"] for src in sources.values())


def test_a_wrong_row_shows_as_error():
    """The error is the prediction against what the row reports: halving the report doubles the ratio."""
    row = load_rows()[1][0]
    p = predict_row(row)
    unit = p.unit
    q = predict_row(dict(row, reported={unit: p.reported / 2}))
    assert q.predicted == pytest.approx(p.predicted)
    assert 1 + q.error == pytest.approx(2 * (1 + p.error))


def _gpt3(name: str, b: int, **parallel) -> tuple[Workload, Layout]:
    from threefold.config import ParallelConfig

    w = Workload(model=ModelConfig(preset=name, **MODEL_PRESETS[name]), seq_len=2048, global_batch_size=64)
    return w, Layout(parallel=ParallelConfig(**parallel), micro_batch_size=b, recompute="full")


KERNELS = [
    Kernels(),
    Kernels(attention="materialized", dropout=True, dp_overlap=False),
    Kernels(compiled=True),
]


@pytest.mark.parametrize("kernels", KERNELS)
def test_terms_add_up_to_the_step(kernels):
    w, lay = _gpt3("gpt3-39b", 2, tp_size=8, pp_size=2, dp_size=4, num_model_chunks=2,
                   pipeline_schedule="interleaved")  # fmt: skip
    t = estimate_layout_time(w, lay, PRESETS["a100-80gb"], gpus_per_node=8, kernels=kernels)
    assert sum(t.terms.values()) == pytest.approx(t.step, rel=1e-9)
    for key in ("gemm", "attention", "elementwise", "recompute", "tp_comm", "pp_comm", "bubble", "optimizer"):
        assert t.terms[key] > 0, key


def test_materialized_attention_weighs_most_on_small_hidden_sizes():
    """Scores cost b a s^2 per layer against s h^2 of matmuls: the small model loses a larger share."""
    share = {}
    for name in ("gpt3-1.7b", "gpt3-18b"):
        w, lay = _gpt3(name, 1, tp_size=1)
        hw = PRESETS["a100-80gb"]
        flash = estimate_layout_time(w, lay, hw, gpus_per_node=8).step
        unfused = estimate_layout_time(w, lay, hw, gpus_per_node=8, kernels=Kernels(attention="materialized"))
        share[name] = unfused.step / flash - 1
    assert share["gpt3-1.7b"] > share["gpt3-18b"] > 0


def test_unoverlapped_data_parallelism_exposes_the_whole_all_reduce():
    w, lay = _gpt3("gpt3-1.7b", 2, tp_size=1, dp_size=32)
    hw = PRESETS["a100-80gb"]
    hidden = estimate_layout_time(w, lay, hw, gpus_per_node=8)
    exposed = estimate_layout_time(w, lay, hw, gpus_per_node=8, kernels=Kernels(dp_overlap=False))
    all_reduce = hw.all_reduce_time(4.0 * 1.7e9, 32, intra_node=False)
    assert exposed.terms["dp_exposed"] == pytest.approx(all_reduce, rel=0.05)
    assert hidden.terms["dp_exposed"] < exposed.terms["dp_exposed"] - 0.1  # the backward hides part


def test_slower_hardware_is_predicted_slower():
    w, lay = _gpt3("gpt3-7.5b", 2, tp_size=4, dp_size=2)
    fast = PRESETS["a100-80gb"]
    slow = dataclasses.replace(fast, hbm_gbps=fast.hbm_gbps / 2, intra_node_gbps=fast.intra_node_gbps / 2)
    assert (
        estimate_layout_time(w, lay, slow, gpus_per_node=8).step
        > estimate_layout_time(w, lay, fast, gpus_per_node=8).step
    )


def test_kernels_reject_unknown_attention():
    with pytest.raises(ValueError, match="kernels.attention"):
        Kernels(attention="sparse")


def test_plan_validate_prints_the_table(capsys):
    assert main(["plan", "--validate"]) == 0
    out = capsys.readouterr().out
    assert (
        sum(line.startswith("| megatron-") for line in out.splitlines()) == 11
        and "mean |error|" in out
        and "arxiv.org/abs/2104.04473" in out
    )


def test_plan_explain_prints_terms_and_sources(capsys):
    argv = ["plan", "--model", "llama-8b", "--gpus", "16", "--gpus-per-node", "8", "--gpu", "h100",
            "--seq", "4096", "--global-batch", "64", "--explain", "--top", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "term by term" in out and "  gemm " in out and "  total " in out
    assert "8 x NDR 400 Gb/s" in out  # the preset's sources


def test_memory_within_bounds_of_measured_peaks(predictions):
    """Peak memory against torch.cuda.max_memory_allocated on every row that measured it (eager and
    compiled, no / selective / full recomputation, ZeRO-1, TP and PP layouts)."""
    errors = {p.row["id"]: p.memory_error for p in predictions if p.memory_error is not None}
    assert len(errors) >= 15
    assert sum(abs(e) for e in errors.values()) / len(errors) <= 0.06, errors
    assert max(abs(e) for e in errors.values()) <= 0.101, errors  # the worst, dp4 ZeRO-1 compiled: +10.0%


def test_compiled_memory_drops_the_fp32_norm_copies():
    """Under torch.compile a llama layer saves 8 b s h bytes less (two norms' fp32 copies), gpt2 the same;
    the eager bf16 loss holds a chunk's logits, its fp32 copy and its gradient (8 bytes a logit), the compiled
    run's Triton kernels the logits alone, overwritten by their gradient (2 bytes)."""
    from threefold.plan.memory_model import head_loss_activation, layer_activation_bytes

    kw = dict(
        micro_batch_size=2, seq_len=64, tp_size=1, dtype_bytes=2, recompute="none", sequence_parallel=False
    )
    llama, gpt2 = ModelConfig(**MODEL_PRESETS["tiny"]), ModelConfig(**MODEL_PRESETS["gpt2-124m"])
    eager, compiled = (layer_activation_bytes(llama, **kw, compiled=c) for c in (False, True))
    assert eager - compiled == 8 * 2 * 64 * llama.hidden_size
    assert layer_activation_bytes(gpt2, **kw) == layer_activation_bytes(gpt2, **kw, compiled=True)
    head = {k: v for k, v in kw.items() if k != "recompute"}
    (_, t_eager), (_, t_compiled) = (head_loss_activation(llama, **head, compiled=c) for c in (False, True))
    assert t_eager == 4 * t_compiled


def test_thin_matmuls_are_memory_bound():
    """A matmul's time is the longer of its FLOPs at the size's efficiency and its bytes at HBM bandwidth."""
    hw = PRESETS["h100"]
    thin = hw.matmul_time(8192, 8192, 8)  # q k^T over an 8-wide head: 128 MiB of scores for 1 GFLOP
    assert thin == pytest.approx(hw.memory_time(2 * (8192 * 8 * 2 + 8192 * 8192)))
    assert thin > hw.gemm_time(2.0 * 8192 * 8192 * 8)
    assert hw.matmul_time(8192, 8192, 8192) == hw.gemm_time(2.0 * 8192**3)


def test_calibration_measures_attention():
    import torch

    from threefold.plan.calibrate import measure_attention_efficiency

    eff = measure_attention_efficiency(torch.device("cpu"), 0.05, seq_len=128, num_heads=2, head_dim=32)
    assert 0 < eff <= 1


def test_calibration_times_short_kernels_back_to_back(monkeypatch):
    """A call far shorter than a launch plus a synchronization is timed over many back-to-back calls, so
    that the overhead is not charged to it: with a 0.2 ms synchronization (a stand-in for the GPU's) a
    10-microsecond call must come out near 10 microseconds, not near 200. The bound, half the
    synchronization, leaves room for a busy machine (26.7 us was seen with two test runs sharing two
    cores) and still fails where each call pays one synchronization."""
    import time

    import torch

    import threefold.plan.calibrate as calibrate

    calls = 0

    def short() -> None:
        nonlocal calls
        calls += 1
        end = time.perf_counter() + 10e-6
        while time.perf_counter() < end:
            pass

    monkeypatch.setattr(calibrate, "_sync", lambda device: time.sleep(2e-4))
    seconds = calibrate._timed(short, torch.device("cpu"), repeats=3)
    assert calls > 500  # not one call per repeat
    assert seconds < 100e-6, f"{seconds * 1e6:.1f} us per call: the synchronization was charged to the call"


NINTH_SESSION = {  # bench/results/issue18-2026-12-04-s9/call{1,4}: (tokens/s, peak GiB) on one H200
    8: {"row": "h200-1b-b8-g8", "direct": (68_055, 45.3), "buffers": (67_074, 50.9), "now": (69_216, 43.4)},
    4: {"row": "h200-1b-b4", "direct": (65_171, 33.0), "buffers": (63_740, 38.6), "now": (66_090, 31.5)},
}
"""llama-1b, seq 2048, compiled, bf16, global batch = micro-batch, `bench/fp8.py --modes false`: in call 1
with direct gradients (b533103) and with the fp32 buffers (the tree before them, 55bbca5); "now", the
validation row, in call 4 with the loss's Triton kernels too (0f1905c)."""


@pytest.mark.parametrize("batch", sorted(NINTH_SESSION))
def test_direct_gradients_against_the_ninth_session(predictions, batch):
    """The row measured with direct gradients is predicted with them, its peak within the memory test's
    largest error (10.1%); against the fp32 buffers the model drops the whole 4 P of the peak, as measured
    (5.6 GiB), and the step gets faster, as measured (2.8-3.6 ms), by at most twice that."""
    from threefold.plan.memory_model import worst_rank

    measured = NINTH_SESSION[batch]
    (row,) = (p for p in predictions if p.row["id"] == measured["row"])
    w = Workload(model=ModelConfig(preset="llama-1b", **MODEL_PRESETS["llama-1b"]), seq_len=2048,
                 global_batch_size=batch)  # fmt: skip
    assert row.layout.direct_grads(batch) and row.row["kernels"].get("direct_grads", True)
    assert (row.reported, row.row["measured_peak_gib"]) == measured["now"]
    assert row.memory_error is not None and abs(row.memory_error) <= 0.101, row.memory_error
    hw = PRESETS["h200"]
    memory, step = {}, {}
    for name, flag in (("direct", True), ("buffers", False)):
        memory[name] = worst_rank(w, row.layout, compiled=True, direct_grads=flag).total / 2**30
        kernels = Kernels(compiled=True, direct_grads=flag)
        step[name] = estimate_layout_time(w, row.layout, hw, gpus_per_node=1, kernels=kernels).step
        assert abs(memory[name] / measured[name][1] - 1) <= 0.101, (name, memory[name])
    assert memory["direct"] == pytest.approx(row.memory_gib)
    measured_drop = measured["buffers"][1] - measured["direct"][1]
    assert memory["buffers"] - memory["direct"] == pytest.approx(measured_drop, abs=0.1)
    seconds = {name: batch * 2048 / measured[name][0] for name in ("direct", "buffers")}
    faster, measured_faster = step["buffers"] - step["direct"], seconds["buffers"] - seconds["direct"]
    assert 0 < faster <= 2 * measured_faster, (faster, measured_faster)


def test_rows_measured_with_fp32_buffers_are_direct_gradient_settings(predictions):
    """kernels.direct_grads false marks a row measured before direct gradients whose setting now runs
    with them (one GPU, one micro-batch a step): anywhere else the mark would change nothing."""
    marked = [p for p in predictions if p.row.get("kernels", {}).get("direct_grads") is False]
    assert {p.row["id"] for p in marked} == {
        "h100-1b-b4",
        "h100-1b-b8-g8",
        "h200-1b-b8-sel",
        "h200-1b-b8-full",
    }
    for p in marked:
        assert p.layout.direct_grads(p.row["global_batch_size"]), p.row["id"]
