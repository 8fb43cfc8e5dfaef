# Call A (thirty-second session), carry .tt and data/fp8-corpus. The issue's headline through the trainers:
# one round of bench/torchtitan_side_by_side.sh at batches 8 and 4 (TorchTitan v0.2.2 and `threefold train`,
# bf16, interleaved), then `threefold train` with rowwise float8 and the float8 output layer at micro-batches
# 8 and 4 (bench/fp8_loss.toml: llama-1b, seq 2048, compiled, real tokens, 70 steps, median tokens/s of the
# last 60). BUDGET_S: no float8 run starts after that many seconds.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s32a}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/card.txt"
ROUND_S=1 OUT=$out/side_by_side bash bench/torchtitan_side_by_side.sh "8 4"
fp8="--training.fp8=rowwise --training.fp8_output_layer=true"
for mb in 8 4; do
  [ $(( $(date +%s) - t0 )) -lt ${BUDGET_S:-420} ] || break
  dir=/tmp/train_fp8_$mb
  PYTHONPATH=$PWD timeout 140 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.micro_batch_size=$mb --training.global_batch_size=$mb $fp8 --logging.out_dir=$dir \
    > "$out/train_fp8_$mb.log" 2>&1
  echo "== train fp8 mb $mb rc $? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$out/train_fp8_$mb.log")"
  cp $dir/metrics.jsonl "$out/train_fp8_$mb.jsonl"
done
echo "total $(( $(date +%s) - t0 )) s"
