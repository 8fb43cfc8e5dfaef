# Call D (thirty-first session), carry data/fp8-corpus. The headline through `threefold train`
# (bench/fp8_loss.toml: llama-1b, seq 2048, compiled, real tokens, 70 steps, median tokens/s of the last 60),
# bf16 and rowwise + float8 output layer, one micro-batch a step. On an H200 (the issue's targets are H200
# figures): micro-batch 8 then 4, both modes. Elsewhere: micro-batch 4 only (micro-batch 8 ran in the
# twenty-ninth session). BUDGET_S: no new run starts after that many seconds.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s31d}; mkdir -p "$out"
card=$(nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt")
case "$card" in *H200*) sizes="8 4" ;; *) sizes="4" ;; esac
fp8="--training.fp8=rowwise --training.fp8_output_layer=true"
for mb in $sizes; do
  for mode in bf16 fp8; do
    [ $(( $(date +%s) - t0 )) -lt ${BUDGET_S:-400} ] || break 2
    extra=""; [ $mode = fp8 ] && extra=$fp8
    dir=/tmp/train_${mode}_$mb
    PYTHONPATH=$PWD timeout 140 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
      --training.micro_batch_size=$mb --training.global_batch_size=$mb $extra --logging.out_dir=$dir \
      > "$out/train_${mode}_$mb.log" 2>&1
    echo "== train $mode mb $mb rc $? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$out/train_${mode}_$mb.log")"
    cp $dir/metrics.jsonl "$out/train_${mode}_$mb.jsonl"
  done
done
echo "total $(( $(date +%s) - t0 )) s"
