# Call B (thirty-first session), carry data/fp8-corpus: the float8 weight cache's GPU test as revised after
# call A (each step of the cached run starts from the uncached run's weights; losses bit for bit, both
# recipes); then, on an H200 only, the issue's bf16 targets (issue18-2026-12-06-s29/h200_targets.sh).
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/s31b}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -m gpu tests/test_gpu_fp8.py -k cast_once --tb=short \
  -p no:logging -p no:cacheprovider > "$out/gpu-tests.txt" 2>&1
echo "== gpu test rc $?"; tail -3 "$out/gpu-tests.txt"
OUT=$out bash bench/results/issue18-2026-12-06-s29/h200_targets.sh
