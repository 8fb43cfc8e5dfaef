# Call D (thirtieth session), carry data/fp8-corpus: the revised GPU test of the float8 weight cache; then, on
# an H200 only, the issue's bf16 targets (issue18-2026-12-06-s29/h200_targets.sh).
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/s30d}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
PYTHONPATH=$PWD timeout 170 python3 -m pytest -q -m gpu tests/test_gpu_fp8.py -k cast_once --tb=short \
  -p no:logging -p no:cacheprovider > "$out/gpu-tests.txt" 2>&1
echo "== gpu test rc $?"; tail -3 "$out/gpu-tests.txt"
OUT=$out bash bench/results/issue18-2026-12-06-s29/h200_targets.sh
