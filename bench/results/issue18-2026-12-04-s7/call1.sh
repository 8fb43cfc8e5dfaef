# Call 1: the fp8 and one-graph GPU tests on HEAD, then the loss guard's pair (bf16, fp8 tensorwise) with seed 1235.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout -k 5 200 python -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu_fp8.py tests/test_gpu.py -k "not graphed" > $OUT/gpu_tests.txt 2>&1; echo "tests rc=$?"; tail -n 3 $OUT/gpu_tests.txt
SEED=1235 bash bench/fp8_loss.sh
