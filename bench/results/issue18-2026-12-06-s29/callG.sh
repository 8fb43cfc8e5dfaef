# Call G (twenty-ninth session), carry data/fp8-corpus. After call E (fp8.amax and the eager one-pass row
# cast): eager bf16 profiled as call E profiled eager float8 (the README's eager float8 line needs its bf16
# partner), then the headline through `threefold train` at this commit, bf16 and rowwise + float8 output
# layer, micro-batch 8, compiled, 70 steps on real tokens (as the twenty-seventh session's call C).
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s29g}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.micro_batch_size=8 --training.global_batch_size=8 --training.compile=false"
PYTHONPATH=$PWD timeout 120 python3 bench/profile_step.py $args --steps 4 > "$out/profile_bf16_eager.txt" 2>&1
echo "== bf16 eager rc $? ($(( $(date +%s) - t0 )) s)"; grep -E "^step time|^peak" "$out/profile_bf16_eager.txt"
fp8="--training.fp8=rowwise --training.fp8_output_layer=true"
for mode in bf16 fp8; do
  extra=""; [ $mode = fp8 ] && extra=$fp8
  dir=/tmp/train_$mode
  PYTHONPATH=$PWD timeout 140 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.micro_batch_size=8 --training.global_batch_size=8 $extra --logging.out_dir=$dir \
    > "$out/train_$mode.log" 2>&1
  echo "== train $mode rc $? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$out/train_$mode.log")"
  cp $dir/metrics.jsonl "$out/train_$mode.jsonl"
done
echo "total $(( $(date +%s) - t0 )) s"
