# Call F (twenty-ninth session). Call E's test step printed nothing: `timeout 150` stopped pytest before its
# summary line (the six profiles after it began at about 150 s). Here the float8 GPU tests alone, verbose,
# with room to finish, and each test's time.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s29f}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
PYTHONPATH=$PWD timeout ${TESTS_S:-460} python3 -m pytest -v -m gpu tests/test_gpu_fp8.py \
  tests/test_fp8_output_layer.py --tb=short -p no:logging -rs --durations=0 > "$out/gpu-tests.txt" 2>&1
echo "pytest rc $? ($(( $(date +%s) - t0 )) s)"
grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" "$out/gpu-tests.txt" | tail -30
