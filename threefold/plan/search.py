"""The layout search: enumerate valid (t, p, d, v, b, schedule, recompute, ZeRO) layouts, keep those that fit,
rank them by predicted throughput, and say why the best one wins.

Memory comes from plan.memory_model, time from plan.time_model; this module only enumerates,
filters, sorts and explains. Fixing a setting by its Config field name (`fixed={"tp_size": 2}`) restricts
the search to it, so a user can ask how fast the layout they already run is and what would beat it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from threefold.config import ParallelConfig
from threefold.pipeline.schedules import ScheduleName, check_schedule_args
from threefold.plan.hardware import GIB, Hardware
from threefold.plan.layout import Layout, Workload
from threefold.plan.memory_model import RankMemory, worst_rank
from threefold.plan.time_model import (
    EAGER,
    Kernels,
    StepTime,
    estimate_layout_time,
    layout_caches_fp8_weights,
)

RECOMPUTE_ORDER = ("none", "selective", "full")
FIXABLE = ("tp_size", "pp_size", "dp_size", "cp_size", "num_model_chunks", "micro_batch_size", "recompute",
           "zero", "pipeline_schedule")  # fmt: skip
"""The settings `fixed` may pin, by their Config field names."""
LONG_CONTEXT = 16384
"""Sequences from this length on are also tried split over context-parallel ranks (shorter ones gain
nothing from it that tensor parallelism with sequence parallelism would not give as well)."""


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: RankMemory
    time: StepTime

    def as_dict(self) -> dict[str, Any]:
        """A JSON record; the layout under the short keys of `threefold bench`'s records (tp, pp, dp, v,
        schedule, and cp when it splits the sequence), which bench/plan_compare.py matches against."""
        lay, par, t = self.layout, self.layout.parallel, self.time
        return {
            "tp": par.tp_size,
            "pp": par.pp_size,
            "dp": par.dp_size,
            **({"cp": par.cp_size} if par.cp_size > 1 else {}),
            "v": par.num_model_chunks,
            "micro_batch_size": lay.micro_batch_size,
            "schedule": par.pipeline_schedule,
            "recompute": lay.recompute,
            "zero": par.zero,
            "tokens_per_s_per_gpu": round(t.tokens_per_s_per_gpu, 1),
            "tflops_per_gpu": round(t.tflops_per_gpu, 2),
            "mfu": round(t.mfu, 4),
            "memory_gib": round(self.memory.total / GIB, 2),
            "bubble_fraction": round(t.bubble_fraction, 4),
            "step_time_s": round(t.step, 4),
            "time_s": {k: round(v, 4) for k, v in t.as_dict().items() if k not in _RATES},
            "memory_gib_by_component": {k: round(v / GIB, 2) for k, v in self.memory.as_dict().items()},
            "overrides": lay.overrides(),
        }


_RATES = ("tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "bubble_fraction")


@dataclass
class PlanResult:
    ranked: list[Candidate]
    """Layouts that fit, fastest first."""
    too_big: list[Candidate] = field(default_factory=list)
    """Valid layouts that do not fit in memory (smallest first)."""
    capacity_bytes: float = 0.0


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def enumerate_layouts(
    w: Workload,
    num_gpus: int,
    *,
    fixed: dict[str, Any] | None = None,
    allow_zero: bool = True,
    max_micro_batch: int = 16,
    max_v: int = 8,
) -> Iterator[Layout]:
    """Every layout the code can run for `w` on `num_gpus` GPUs, restricted to the `fixed` values."""
    fixed = fixed or {}
    unknown = sorted(set(fixed) - set(FIXABLE))
    if unknown:
        raise ValueError(f"cannot fix {unknown}; the search varies {', '.join(FIXABLE)}")
    m = w.model
    assert m.num_kv_heads is not None and m.ffn_hidden_size is not None

    def allowed(key: str, value: Any) -> bool:
        return key not in fixed or fixed[key] == value

    for tp_size in _divisors(num_gpus):
        kv_fits = m.num_kv_heads % tp_size == 0 or tp_size % m.num_kv_heads == 0  # shared kv heads
        if not allowed("tp_size", tp_size) or m.num_heads % tp_size or not kv_fits:
            continue
        if m.ffn_hidden_size % tp_size:
            continue
        for cp_size in _divisors(num_gpus // tp_size):
            if not allowed("cp_size", cp_size) or w.seq_len % (2 * cp_size if cp_size > 1 else 1):
                continue
            if cp_size > 1 and w.seq_len < LONG_CONTEXT and "cp_size" not in fixed:
                continue
            for parallel, b in _pipeline_and_data(
                w, num_gpus, tp_size, cp_size, allowed, fixed, max_micro_batch, max_v
            ):
                yield from _variants(w, parallel, b, fixed, allow_zero)


def _pipeline_and_data(
    w: Workload,
    num_gpus: int,
    tp_size: int,
    cp_size: int,
    allowed: Any,
    fixed: dict[str, Any],
    max_micro_batch: int,
    max_v: int,
) -> Iterator[tuple[ParallelConfig, int]]:
    """The (p, d, v) splits of the GPUs left after t and c, with every micro-batch size b."""
    m = w.model
    for pp_size in _divisors(num_gpus // (tp_size * cp_size)):
        dp_size = num_gpus // (tp_size * cp_size * pp_size)
        if not allowed("pp_size", pp_size) or not allowed("dp_size", dp_size) or pp_size > m.num_layers:
            continue
        if w.global_batch_size % dp_size:
            continue
        vs = [1] if pp_size == 1 else [v for v in range(1, max_v + 1) if pp_size * v <= m.num_layers]
        if "num_model_chunks" not in fixed:  # the paper's interleaving splits the layers evenly
            vs = [v for v in vs if v == 1 or m.num_layers % (pp_size * v) == 0]
        for v in vs:
            if not allowed("num_model_chunks", v):
                continue
            for b in _divisors(w.global_batch_size // dp_size):
                if not allowed("micro_batch_size", b) or (
                    b > max_micro_batch and "micro_batch_size" not in fixed
                ):
                    continue
                parallel = ParallelConfig(
                    tp_size=tp_size, pp_size=pp_size, dp_size=dp_size, cp_size=cp_size, num_model_chunks=v
                )
                yield parallel, b


def _variants(
    w: Workload, parallel: ParallelConfig, b: int, fixed: dict[str, Any], allow_zero: bool
) -> Iterator[Layout]:
    """The schedules, recomputation and ZeRO settings of one (t, p, d, v, b)."""
    pp_size, v, dp_size = parallel.pp_size, parallel.num_model_chunks, parallel.dp_size
    num_mb = w.global_batch_size // (dp_size * b)
    schedules: list[ScheduleName] = (
        ["interleaved", "zb-v"] if v == 2 else ["interleaved"] if v > 1
        else ["1f1b", "zb-h1", "gpipe"] if pp_size > 1 else ["1f1b"]
    )  # fmt: skip
    if "pipeline_schedule" not in fixed and pp_size > 1 and v == 1:
        schedules = ["1f1b", "zb-h1"]  # GPipe has 1F1B's bubble and more memory: never better
    if w.model.tie_embeddings and pp_size > 1:
        schedules = [s for s in schedules if s != "zb-v"]  # config validation refuses it (see validate.py)
    for schedule in schedules:
        if "pipeline_schedule" in fixed and fixed["pipeline_schedule"] != schedule:
            continue
        try:
            check_schedule_args(schedule, pp_size, v, num_mb)
        except ValueError:
            continue
        for recompute in RECOMPUTE_ORDER:
            if "recompute" in fixed and fixed["recompute"] != recompute:
                continue
            for zero in (False, True):
                if zero and (dp_size * parallel.cp_size == 1 or not allow_zero):  # ZeRO shards over d c
                    continue
                if "zero" in fixed and fixed["zero"] != zero:
                    continue
                yield Layout(
                    parallel=dataclasses.replace(parallel, pipeline_schedule=schedule, zero=zero),
                    micro_batch_size=b,
                    recompute=recompute,
                )


def _memory_savers(lay: Layout) -> Iterator[Layout]:
    """`lay` with ZeRO stage 2 or 3 (with data parallelism), or with the optimizer offloaded."""
    par = lay.parallel
    if par.dp_size > 1 and par.zero:
        for stage in (2, 3):
            yield dataclasses.replace(lay, parallel=dataclasses.replace(par, zero=stage))
    if par.dp_size == 1 or par.zero:
        yield dataclasses.replace(lay, offload=True)


def _zero_text(lay: Layout) -> str:
    """The table's zero column: off, on (stage 1), z2, z3; +o with the optimizer offloaded."""
    stage = int(lay.parallel.zero)
    return ("off", "on", "z2", "z3")[stage] + ("+o" if lay.offload else "")


def _preference(c: Candidate) -> tuple:
    """Fastest first; among equals, less model parallelism, less recomputation, no ZeRO, fewer chunks."""
    lay, par = c.layout, c.layout.parallel
    return (
        -round(c.time.tokens_per_s_per_gpu, 6),
        par.tp_size * par.pp_size,
        RECOMPUTE_ORDER.index(lay.recompute),
        par.zero,
        lay.offload,
        par.num_model_chunks,
        -lay.micro_batch_size,
    )


def peak_memory(w: Workload, lay: Layout, kernels: Kernels) -> RankMemory:
    """The most loaded rank's memory of `lay` running `kernels` (memory_model.worst_rank)."""
    return worst_rank(
        w, lay, compiled=kernels.compiled, direct_grads=kernels.direct_grads,
        fp8_weights=layout_caches_fp8_weights(kernels, w, lay), fp8_output_layer=kernels.fp8_output_layer,
    )  # fmt: skip


def plan(
    w: Workload,
    hw: Hardware,
    *,
    num_gpus: int,
    gpus_per_node: int,
    fixed: dict[str, Any] | None = None,
    memory_margin: float = 0.05,
    allow_zero: bool = True,
    kernels: Kernels = EAGER,
) -> PlanResult:
    """Evaluate every valid layout; those whose peak memory is within (1 - margin) of usable memory fit.
    `kernels`: the software the step runs (threefold's eager path by default)."""
    capacity = hw.usable_bytes * (1 - memory_margin)
    ranked: list[Candidate] = []
    too_big: list[Candidate] = []
    g = min(gpus_per_node, num_gpus)
    layouts = list(enumerate_layouts(w, num_gpus, fixed=fixed, allow_zero=allow_zero))
    for lay in layouts:
        mem = peak_memory(w, lay, kernels)
        time = estimate_layout_time(w, lay, hw, gpus_per_node=g, kernels=kernels)
        (too_big if mem.total > capacity else ranked).append(Candidate(lay, mem, time))
    if not ranked and allow_zero and "zero" not in (fixed or {}):
        # Nothing fits: the slower memory savers, ZeRO-2/3 and optimizer offload, get their turn.
        for saver in (saver for lay in layouts for saver in _memory_savers(lay)):
            mem = peak_memory(w, saver, kernels)
            if mem.total <= capacity:
                time = estimate_layout_time(w, saver, hw, gpus_per_node=g, kernels=kernels)
                ranked.append(Candidate(saver, mem, time))
    ranked.sort(key=_preference)
    too_big.sort(key=lambda c: c.memory.total)
    return PlanResult(ranked=ranked, too_big=too_big, capacity_bytes=capacity)


_TERMS = {
    "compute": "compute",
    "tp_comm": "tensor-parallel all-reduces",
    "pp_comm": "pipeline transfers",
    "bubble": "pipeline bubble",
    "dp_exposed": "exposed data-parallel communication",
    "optimizer": "optimizer step",
}


def _why_slower(best: Candidate, other: Candidate) -> str:
    """The term that grows most from `best` to `other`."""
    b, o = best.time.as_dict(), other.time.as_dict()
    key = max(_TERMS, key=lambda k: o[k] - b[k])
    return f"{_TERMS[key]} +{o[key] - b[key]:.3f} s/step"


def explain(result: PlanResult) -> list[str]:
    """Why the first layout wins: its margin over the best layout that differs in each dimension."""
    if not result.ranked:
        return []
    best = result.ranked[0]
    lay, t = best.layout, best.time
    lines = [
        f"best: {lay.label()}: {t.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, {t.mfu:.1%} MFU, "
        f"{best.memory.total / GIB:.1f} of {result.capacity_bytes / GIB:.1f} GiB usable; "
        f"step {t.step:.3f} s = compute {t.compute:.3f} + TP {t.tp_comm:.3f} + p2p {t.pp_comm:.3f} "
        f"+ bubble {t.bubble:.3f} + DP {t.dp_exposed:.3f} + optimizer {t.optimizer:.3f} (+ overhead)"
    ]
    if best.memory.direct:
        lines.append(
            f"direct gradients (one GPU, one micro-batch a step): {best.memory.gradients / GIB:.1f} GiB of "
            "autograd's own, made as the backward frees the activations (the peak counts the larger of the "
            "two); no fp32 buffers and no move into them"
        )
    dims = [("tp_size", "t"), ("cp_size", "c"), ("pp_size", "p"), ("num_model_chunks", "v"),
            ("micro_batch_size", "b"), ("pipeline_schedule", "schedule"), ("recompute", "recompute"),
            ("zero", "zero")]  # fmt: skip
    for key, name in dims:
        mine = lay.get(key)
        rival = next((c for c in result.ranked[1:] if c.layout.get(key) != mine), None)
        if rival is not None:
            slower = 1 - rival.time.tokens_per_s_per_gpu / t.tokens_per_s_per_gpu
            lines.append(
                f"vs {name}={rival.layout.get(key)} (best: {rival.layout.label()}): {slower:.1%} "
                f"slower, {_why_slower(best, rival)}"
            )
        big = next((c for c in result.too_big if c.layout.get(key) != mine), None)
        if big is not None and (rival is None or _preference(big) < _preference(rival)):
            lines.append(
                f"{name}={big.layout.get(key)} would be faster ({big.layout.label()}) but needs "
                f"{big.memory.total / GIB:.1f} GiB"
            )
    return lines


def explain_terms(best: Candidate, hw: Hardware) -> list[str]:
    """The step time of `best` term by term (seconds per step on its slowest pipeline rank, share of the
    step), then the hardware values they rest on and where those come from."""
    from threefold.plan.hardware import PRESET_SOURCES
    from threefold.plan.time_model import TERMS

    t = best.time
    lines = [f"step time of {best.layout.label()}, term by term (slowest pipeline rank):"]
    for key, what in TERMS.items():
        seconds = t.terms.get(key, 0.0)
        if seconds > 0:
            lines.append(f"  {key:<16} {seconds:>9.4f} s {seconds / t.step:>6.1%}  {what}")
    lines.append(f"  {'total':<16} {sum(t.terms.values()):>9.4f} s  (step {t.step:.4f} s)")
    lines.append(
        f"hardware {hw.name}: peak {hw.peak_tflops:g} TFLOP/s, HBM {hw.hbm_gbps:g} GB/s"
        + (f" (compiled kernels' counted bytes at {hw.fused_gbps:g})" if hw.fused_gbps else "")
        + ", all-reduce bus "
        f"{hw.intra_node_gbps:g} GB/s in a node / {hw.inter_node_gbps:g} across, latency "
        f"{hw.latency_us:g} us, attention at {hw.attention_efficiency:.0%} of peak, "
        f"GEMM curve (GFLOP, fraction) {list(hw.gemm_curve)}"
    )
    for key, source in PRESET_SOURCES.get(hw.name, {}).items():
        lines.append(f"  {key}: {source}")
    return lines


def format_table(candidates: list[Candidate], hw: Hardware) -> str:
    """The ranked layouts as a fixed-width table (with a c column when any layout splits the sequence)."""
    with_cp = any(c.layout.parallel.cp_size > 1 for c in candidates)
    header = (
        f"{'#':>2}  {'t':>2} {'p':>2} {'d':>3} {'v':>2} {'b':>2}  {'schedule':<11} {'recompute':<9} "
        f"{'zero':<5} {'tokens/s/GPU':>12} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6} {'bubble':>7} {'step s':>7}"
    )
    if with_cp:
        header = header.replace(f"{'d':>3} ", f"{'d':>3} {'c':>2} ", 1)
    rows = [header, "-" * len(header)]
    for i, c in enumerate(candidates, 1):
        lay, par, t = c.layout, c.layout.parallel, c.time
        cp = f"{par.cp_size:>2} " if with_cp else ""
        rows.append(
            f"{i:>2}  {par.tp_size:>2} {par.pp_size:>2} {par.dp_size:>3} {cp}{par.num_model_chunks:>2} "
            f"{lay.micro_batch_size:>2}  {(par.pipeline_schedule if par.pp_size > 1 else '-'):<11} "
            f"{lay.recompute:<9} {_zero_text(lay):<5} {t.tokens_per_s_per_gpu:>12,.0f} "
            f"{t.tflops_per_gpu:>8.1f} {t.mfu:>6.1%} "
            f"{c.memory.total / GIB:>6.1f} {t.bubble_fraction:>7.1%} {t.step:>7.3f}"
        )
    return "\n".join(rows)
