# Call A (twenty-third session): the float8 output layer (training.fp8_output_layer) on a GPU, any Hopper
# card (every ratio below is against the same card's bf16, measured on it in call B). Carry
# data/fp8-corpus. The GPU float8 tests, then the 500-step loss-guard run of rowwise with the output layer
# in float8 (bench/fp8_loss.sh, seed 1234; its metrics give tokens/s through `threefold train` too).
out=${OUT:-/tmp/s23a}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
python3 -m pytest -q -m gpu tests/test_gpu_fp8.py 2>&1 | tail -6 | tee "$out/gpu-tests.txt"
SEED=1234 MODES="rowwise+output" OUT=$out bash bench/fp8_loss.sh
# (this call lost its files: the device returns none with a + in its name; callC.sh renames them)
