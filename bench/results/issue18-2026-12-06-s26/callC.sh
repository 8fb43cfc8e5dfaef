# Call C (twenty-sixth session), carry .tt and data/fp8-corpus. On an H200, call A (the side by side with
# TorchTitan, then rowwise + float8 output layer through `threefold train`). On any other card: the GPU test
# of the wide-row reductions, then `threefold train bench/fp8_loss.toml` (llama-1b, seq 2048, real tokens,
# 70 steps, micro-batch 8) in bf16 and in rowwise + float8 output layer, the code with the wide rows.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s26c}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
case "$(cat "$out/card.txt")" in *H200*) OUT=$out bash bench/results/issue18-2026-12-06-s26/callA.sh; exit ;; esac
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -k "wide_rows" --tb=line -p no:logging \
  2>&1 | grep -vE "DEBUG|^\s*$" | tail -8 | tee "$out/gpu-tests.txt"
for mode in bf16 rowwise bf16 rowwise; do
  [ $(( $(date +%s) - t0 )) -lt 470 ] || break
  extra=""; [ $mode = rowwise ] && extra="--training.fp8=rowwise --training.fp8_output_layer=true"
  dir=/tmp/train-$mode-$(date +%s)
  PYTHONPATH=$PWD timeout 120 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    $extra --logging.out_dir=$dir > "$dir.log" 2>&1
  echo "threefold $mode micro-batch 8 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$dir.log")" | tee -a "$out/train.txt"
  cp $dir/metrics.jsonl "$out/$(basename $dir).jsonl"
done
echo "total $(( $(date +%s) - t0 )) s"
