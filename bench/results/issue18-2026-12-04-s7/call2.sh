# Call 2: the loss guard's pair with seed 1236, then the one GPU test call 1's 200 s cut off.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
SEED=1236 bash bench/fp8_loss.sh
timeout -k 5 150 python -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py -k "one_graph" > $OUT/gpu_tests.txt 2>&1; echo "tests rc=$?"; tail -n 3 $OUT/gpu_tests.txt
