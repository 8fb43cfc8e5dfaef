"""bench/fp8_grad_error.py with --data: a few float32 steps on a prepared dataset, then every recipe's weight
gradients against float32's and the linears' input outliers, run as the command a user runs."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_gradient_error_tool_trains_then_compares_every_recipe(sonnets_dataset):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(_free_port())}
    command = [sys.executable, str(ROOT / "bench/fp8_grad_error.py"), "--data", str(sonnets_dataset)]
    command += ["--train-steps", "3", "--hidden", "64", "--layers", "1", "--tokens", "128"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=True).stdout
    assert "after 3 float32 steps" in out
    assert len(re.findall(r"^train step \d+: loss \d+\.\d+$", out, re.M)) == 2  # steps 0 and 2
    outliers = dict(re.findall(r"(\w+_proj) (\d+\.\d+)", out.split("median over layers:")[1].split("\n")[0]))
    assert set(outliers) == {f"{k}_proj" for k in ("q", "k", "v", "o", "gate", "up", "down")}
    assert all(float(v) >= 1.0 for v in outliers.values())  # max |x| is never below the rms
    rows = {
        name: (float(err), float(kept))
        for name, err, kept in re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    }
    assert len(rows) == 6 and "fp8 mixed (down projection rowwise)" in rows
    bf16_error = rows.pop("bf16")[0]
    for name, (error, kept) in rows.items():
        # float8's 3 or 2 mantissa bits err far more than bf16's 8, and keep most of float32's gradient
        assert bf16_error < error < 0.5, (name, error)
        assert 0.8 < kept < 1.1, (name, kept)
    casts = re.findall(r"^\| (\w+_proj) (x|dy) \| (e4m3fn|e5m2) \| (.+) \|$", out, re.M)
    assert len(casts) == 7 * 2 * 2  # every linear's x and dy in both formats
    for kind, which, dtype, cells in casts:
        for flushed, error in re.findall(r"([\d.]+)% / ([\d.]+)", cells):
            # float8 rounding: at most 2^-4 (e4m3) or 2^-3 (e5m2) relative, about a quarter of it on average
            assert 0.0 < float(error) < (0.07 if dtype == "e4m3fn" else 0.14), (kind, which, dtype, error)
            assert float(flushed) < 50.0
