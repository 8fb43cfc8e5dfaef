# Issue 18's bf16 targets on an H200 only (carry data/fp8-corpus), for a session with little device time
# left: on any other card it stops at once. `threefold train bench/fp8_loss.toml` (llama-1b, seq 2048,
# bf16, compiled, real tokens), 70 steps at micro-batch 8, then 4; median tokens/s of the last 60 steps.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s29h200}; mkdir -p "$out"
card=$(nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt")
case "$card" in *H200*) ;; *) echo "not an H200 ($card): nothing run"; exit 0 ;; esac
for mb in 8 4; do
  dir=/tmp/train$mb
  PYTHONPATH=$PWD timeout 90 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.micro_batch_size=$mb --training.global_batch_size=$mb --logging.out_dir=$dir \
    > "$out/train_bf16_$mb.log" 2>&1
  echo "== bf16 micro-batch $mb rc $? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$out/train_bf16_$mb.log")"
  cp $dir/metrics.jsonl "$out/train_bf16_$mb.jsonl"
done
