export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 150 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_fp8.py tests/test_gpu.py -k "not graphed" 2>&1 | grep -E "passed|failed|FAIL|Error" | head -8
for v in 0 1; do TF_FP8_SAVE_X=$v timeout 150 python bench/fp8.py --budget 100 2>&1 | grep -E "^\| [48] " | sed "s/^/save_x=$v /"; done
