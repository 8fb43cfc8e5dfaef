# Call 2 (commit b2f3ad0): rowwise with the Triton kernel's transposed casts in compiled code (the seventh
# session's last change) through `threefold train`, the loss guard's seed 1234 (500 steps); bf16 of the same
# seed for 150 steps, for tokens/s on this machine; then the GPU tests, which had not run since that change
# and the weight_grads refactor.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
MODES=rowwise SEED=1234 bash bench/fp8_loss.sh
mkdir -p /tmp/bf && OUT=/tmp/bf MODES=false SEED=1234 bash bench/fp8_loss.sh --training.max_steps=150
cp /tmp/bf/false-seed1234.jsonl "$OUT/false-seed1234-150steps.jsonl"
timeout -s INT -k 5 280 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu_fp8.py tests/test_gpu.py \
  -k "not graphed" > "$OUT/gpu_tests.txt" 2>&1; echo "gpu tests rc=$?"; tail -n 5 "$OUT/gpu_tests.txt"
