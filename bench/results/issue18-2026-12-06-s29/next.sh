# The next GPU call for issue 18 (written in the twenty-ninth session). Carry .tt and data/fp8-corpus.
# On an H200: issue18-2026-12-06-s26/callA.sh, the side by side with TorchTitan and float8 through
# `threefold train` (the issue's bf16 targets are H200 figures, unmeasured since the fourteenth session).
# On any other card: one round of the side by side at this commit (the last one ran at b776a84), then, for
# a refit of the planner's compiled float8 cast bytes (the current rowwise + float8 output row is predicted
# 9% slow), bench/profile_step.py compiled at micro-batch 8 for bf16, rowwise, tensorwise and rowwise +
# float8 output layer, on the same machine. BUDGET_S: no new profile starts after that many seconds.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s29next}; mkdir -p "$out"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader)
echo "card: $card"
case "$card" in
  *H200*) OUT=$out bash bench/results/issue18-2026-12-06-s26/callA.sh; exit ;;
esac
ROUND_S=1 OUT=$out bash bench/torchtitan_side_by_side.sh "8 4"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.micro_batch_size=8 --training.global_batch_size=8"
for mode in bf16 rowwise tensorwise rowwise_output; do
  [ $(( $(date +%s) - t0 )) -lt ${BUDGET_S:-480} ] || break
  case $mode in
    bf16) extra="" ;;
    rowwise_output) extra="--training.fp8=rowwise --training.fp8_output_layer=true" ;;
    *) extra="--training.fp8=$mode" ;;
  esac
  PYTHONPATH=$PWD timeout 120 python3 bench/profile_step.py $args $extra --steps 4 > "$out/profile8_$mode.txt" 2>&1
  echo "== $mode rc $? ($(( $(date +%s) - t0 )) s)"; grep -E "^step time|^peak" "$out/profile8_$mode.txt"
done
echo "total $(( $(date +%s) - t0 )) s"
