#!/usr/bin/env bash
# FP8 on one GPU (compute capability >= 8.9), under 7 minutes on one H200: the fp8 GPU tests
# (tests/test_gpu_fp8.py: kernels against the CPU's, compiled against eager, a small Llama against bf16,
# the compiled model's kernel casts against the compiler's; first compiles take most of their time),
# then bench/fp8.py (llama-1b, seq 2048, compile: bf16 vs fp8 tokens/s at micro-batch 8 and 4, and a
# 50-step loss comparison). Usage, from the repo root (with data/shakespeare prepared or carried, the loss
# check reads real text; else synthetic tokens): bash bench/fp8.sh   ($OUT set: records in $OUT/fp8.jsonl)
set -u -o pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
# -o addopts="": pyproject's `-n auto` needs pytest-xdist, which a bare GPU machine may lack.
timeout -s INT -k 5 200 python3 -m pytest -o addopts="" -m gpu -q -rs -p no:cacheprovider tests/test_gpu_fp8.py
timeout -s INT -k 5 170 python3 bench/fp8.py --budget 130 "$@"
