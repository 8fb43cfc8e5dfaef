#!/usr/bin/env bash
# The CUDA-only tests (tests/test_gpu.py, marker `gpu`), which CPU CI skips: the fused AdamW's skipped
# step, the compiled loss against the eager one, the overlapped column-parallel backward, and the graphed
# decode step against the eager loop.
# Needs one GPU and pytest. Usage: bash bench/gpu_tests.sh   (the log also goes to $OUT/gpu_tests.log if
# OUT is set). Exits non-zero if a test fails, or if there is no GPU (every test would only be skipped).
set -u -o pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log=/dev/null
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  log="$OUT/gpu_tests.log"
fi
python3 -c 'import pytest' 2>/dev/null || { echo "pytest is not installed (pip install pytest)" | tee "$log"; exit 2; }
python3 - <<'PY' 2>&1 | tee "$log" || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device: the gpu tests would all be skipped")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}")
PY
# -o addopts="": pyproject's `-n auto` needs pytest-xdist, which a bare GPU machine may lack.
timeout -s ABRT -k 10 570 python3 -m pytest -o addopts="" -m gpu -q -rs tests/test_gpu.py 2>&1 | tee -a "$log"
