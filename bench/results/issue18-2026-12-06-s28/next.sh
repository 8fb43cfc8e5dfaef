# The next GPU call for issue 18 (written in the twenty-eighth session, which had no device time left).
# Carry .old (call E's layout: threefold/model/loss.py, threefold/parallel/fp8.py and fp8_gather.py as at
# e9cc426^, in .old/model/ and .old/parallel/), .tt and data/fp8-corpus. One machine start for both
# outstanding measurements: on an H200, call A (the side by side with TorchTitan and float8 through
# `threefold train`: the issue's bf16 targets, unmeasured since the fourteenth session); on any other
# card, call E (the float8 GPU tests not yet run, then fp8.amax and the eager one-pass row cast profiled
# against the old tree, compiled and eager).
out=${OUT:-/tmp/s28}; mkdir -p "$out"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader)
echo "card: $card"
case "$card" in
  *H200*) OUT=$out bash bench/results/issue18-2026-12-06-s26/callA.sh ;;
  *) OUT=$out BUDGET_S=${BUDGET_S:-450} bash bench/results/issue18-2026-12-06-s27/callE.sh ;;
esac
