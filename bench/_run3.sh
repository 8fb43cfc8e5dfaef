export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
date -u
timeout 90 python -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py -k "fused_adamw" 2>&1 | tail -3
date -u
timeout 80 python bench/optimizer_step.py 2>&1 | grep -v Warning | tail -4
date -u
timeout 330 python bench/fp8.py --compare-update --budget 280 2>&1 | grep -v "Warning\|warn(" | tail -28
date -u
