# The next GPU call for issue 18 (written in the thirtieth session); carry .tt and data/fp8-corpus. First the
# revised GPU test of the float8 weight cache (it now checks the kept casts against compiled code's, and holds
# tensorwise to rounding: calls A and B found its second step 4e-7 apart), then the twenty-ninth session's
# next.sh (on an H200 the issue's targets; elsewhere the side by side at this commit and the planner's refit).
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/s30next}; mkdir -p "$out"
PYTHONPATH=$PWD timeout 170 python3 -m pytest -q -m gpu tests/test_gpu_fp8.py -k cast_once --tb=short \
  -p no:logging -p no:cacheprovider > "$out/gpu-tests.txt" 2>&1
echo "== gpu test rc $?"; tail -3 "$out/gpu-tests.txt"
OUT=$out BUDGET_S=300 bash bench/results/issue18-2026-12-06-s29/next.sh
