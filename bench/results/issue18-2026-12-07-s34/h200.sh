# The thirty-fourth session's call for the issue's H200 figures, carry .tt and data/fp8-corpus. On an H200 it
# runs the thirty-second session's call A (one interleaved round of TorchTitan v0.2.2 and `threefold train`,
# bf16, batches 8 and 4, then `threefold train` with rowwise float8 at micro-batches 8 and 4); on any other card
# it prints the card and stops, since the issue's targets are H200 figures and the H100's were measured in s33.
name=$(nvidia-smi --query-gpu=name --format=csv,noheader)
echo "card: $name"
case "$name" in
  *H200*) OUT=$OUT/callA BUDGET_S=330 bash bench/results/issue18-2026-12-07-s32/callA.sh ;;
  *) echo "not an H200: nothing run" ;;
esac
