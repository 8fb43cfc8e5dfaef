"""`threefold bench`: the JSON record from real worker processes, and layout-independent synthetic data."""

import json
import re
import subprocess
import sys

import pytest
import torch
from distributed import run_ranks

from threefold.bench import format_record, run_bench
from threefold.config import build_config
from threefold.parallel.mesh import build_mesh

SMALL = [
    "--model.preset=tiny",
    "--model.num_layers=2",
    "--model.vocab_size=1000",
    "--data.seq_len=32",
    "--training.device=cpu",
    "--training.global_batch_size=8",
    "--training.micro_batch_size=2",
    "--optimizer.eps=1e-6",
]


def test_bench_prints_one_json_record_and_appends_it(tmp_path):
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "threefold", "bench", *SMALL, "--parallel.dp_size=2", "--parallel.zero=true",
           "--steps", "3", "--warmup=1", "--json-out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 only
    record = json.loads(lines[0])
    assert json.loads(out.read_text()) == record
    assert (record["dp"], record["zero"], record["steps"], record["warmup"]) == (2, True, 3, 1)
    assert record["tokens_per_s_per_gpu"] > 0 and record["step_time_median_s"] > 0
    # 6N + 12lhs: for the tied tiny Llama, N (no input embedding, output projection counted) = all parameters.
    flops_per_token = 6 * record["parameters"] + 12 * 2 * 128 * 32
    assert record["tflops_per_gpu"] == pytest.approx(record["tokens_per_s_per_gpu"] * flops_per_token / 1e12)
    assert record["mfu"] is None and record["device"] == "cpu"  # no peak known for a CPU
    assert len(record["losses"]) == 4 and all(v == v for v in record["losses"])
    assert record["estimated_memory_gib"] > 0
    assert "tokens/s/GPU" in proc.stdout and "peak memory" in proc.stdout
    # Off the GPU, memory is not measured: not a zero that reads as a figure, and TFLOP/s keeps its digits.
    assert record["peak_memory_gib"] is None and record["reserved_memory_gib"] is None
    assert re.search(r"peak memory\s+n/a \(measured on GPUs only", proc.stdout), proc.stdout
    assert not re.search(r"TFLOP/s/GPU\s+0\.0 ", proc.stdout), proc.stdout


def test_bench_rejects_bad_options(tmp_path):
    cmd = [sys.executable, "-m", "threefold", "bench", *SMALL, "--steps", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "--steps must be a positive integer, got '0'" in proc.stderr


def _bench_losses(rank: int, world: int, overrides: list[str]) -> list[float] | None:
    config = build_config({}, SMALL + ["--training.dtype=float32", *overrides], check_paths=False)
    p = config.parallel
    record = run_bench(config, build_mesh(p.tp_size, p.dp_size, p.pp_size), torch.device("cpu"), steps=2,
                       warmup=1)  # fmt: skip
    if record is not None:
        assert format_record(record).startswith("model")
    return record["losses"] if record else None


@pytest.mark.parametrize(
    "overrides",
    [["--parallel.dp_size=2", "--parallel.zero=true"], ["--parallel.tp_size=2", "--parallel.pp_size=2"]],
    ids=["dp2-zero", "tp2-pp2"],
)
def test_synthetic_tokens_are_the_same_for_every_layout(overrides):
    """Every layout trains on the same synthetic global batches, so bench losses compare across layouts."""
    ref = run_ranks(1, _bench_losses, [])[0]
    world = 4 if "--parallel.pp_size=2" in overrides else 2
    got = run_ranks(world, _bench_losses, overrides)[0]
    assert len(got) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=0)


def _bench_record(rank: int, world: int, overrides: list[str]) -> dict | None:
    config = build_config({}, SMALL + overrides, check_paths=False)
    return run_bench(config, build_mesh(1, 1, 1), torch.device("cpu"), steps=1, warmup=0)


def test_bench_record_reports_the_offload_share_auto_picked():
    """The record's share and memory estimate are those of the run, not of 'auto' read as all on the host."""
    from threefold.plan.fit import device_memory, resolve_offload
    from threefold.plan.memory_model import estimate_memory

    overrides = ["--optimizer.offload=true", "--optimizer.offload_fraction=auto"]
    record = run_ranks(1, _bench_record, overrides)[0]
    config = build_config({}, SMALL + overrides, check_paths=False)
    resolved = resolve_offload(config, device_memory(torch.device("cpu"), ranks=1))
    share = resolved.optimizer.offload_fraction
    assert record["offload"] is True and record["offload_fraction"] == share == 0.0  # a tiny model fits
    assert record["estimated_memory_gib"] == pytest.approx(estimate_memory(resolved)["total"] / 2**30)
    assert record["estimated_memory_gib"] > estimate_memory(config)["total"] / 2**30  # 'auto' read as 1.0
