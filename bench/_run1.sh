export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
date -u; nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 240 python -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py -k "graphed or fused_adamw" 2>&1 | tail -8
date -u
timeout 120 python bench/optimizer_step.py 2>&1 | grep -v Warning | tail -5
date -u
timeout 260 python bench/decode_profile.py --variants "whole step, q/k/v apart;compile+graph, matvec, coordinate descent, whole step" 2>&1 | grep -v "Warning\|warn" | tail -25
date -u
