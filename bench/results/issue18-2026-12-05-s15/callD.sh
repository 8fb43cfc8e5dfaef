# Call D (fifteenth session), on call C's warm machine (FlashAttention-4 already unpacked in /tmp/fa4site;
# carry data/fp8-corpus): `threefold train` at micro-batch 8 on real tokens, torch's attention and FA4,
# 70 steps each; then float8 rowwise micro-batch 8 (bench path) both ways: does FA4 compose with float8.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
site=/tmp/fa4site
[ -d $site/flash_attn ] || { echo "no FlashAttention-4 in /tmp: a fresh machine"; exit 3; }
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
for backend in auto fa4; do
  run=/tmp/train8-$backend
  timeout 110 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.attention_backend=$backend --logging.out_dir=$run > $run.log 2>&1
  echo "train mb8 $backend rc=$? ($(( $(date +%s) - t0 )) s)"; grep "^done" $run.log
  cp $run/metrics.jsonl $OUT/train8-$backend.jsonl
done
for backend in auto fa4; do
  [ $(( $(date +%s) - t0 )) -lt 300 ] || break
  timeout 100 python3 bench/fp8.py --modes rowwise --micro-batches 8 --budget 80 --attention-backend $backend \
    > $OUT/rowwise8_$backend.txt 2>&1
  echo "rowwise $backend: $(grep -E "tok/s|FAILED|Error" $OUT/rowwise8_$backend.txt | head -3) ($(( $(date +%s) - t0 )) s)"
done
echo "total $(( $(date +%s) - t0 )) s"
