# Call B (seventeenth session), on call A's warm machine (carry .fa4b and data/fp8-corpus): unpack
# FlashAttention-4; `threefold train` on real text (bench/fp8_loss.toml, 70 steps, logged every step, the
# new log read) at micro-batch 8 and 4, torch's attention and FA4 interleaved, each its own process; the
# bench path at micro-batch 8 with FA4; the card's power and clock logged every 500 ms.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
site=/tmp/fa4site
if [ ! -d $site/flash_attn ]; then
  [ -s /tmp/fa4parts/a ] || { echo "call A's part is not here: a fresh machine"; exit 3; }
  mkdir -p $site && cat /tmp/fa4parts/a .fa4b/part | xz -d | tar -C $site -xf - || exit 4
fi
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
echo "unpacked ($(( $(date +%s) - t0 )) s)"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv -lms 500 > $OUT/power.csv 2>&1 &
smi=$!
train() {  # micro-batch, backend
  dir=/tmp/train$1-$2-$(date +%s)
  timeout 120 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.micro_batch_size=$1 --training.global_batch_size=$1 --training.attention_backend=$2 \
    --logging.out_dir=$dir > $dir.log 2>&1
  echo "train mb$1 $2 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" $dir.log)"
  cp $dir/metrics.jsonl $OUT/$(basename $dir).jsonl; cp $dir.log $OUT/
}
bench() {  # micro-batch, backend
  timeout 120 python3 bench/fp8.py --modes false --micro-batches $1 --budget 80 --attention-backend $2 \
    > $OUT/mb$1_$2_$(date +%s).txt 2>&1
  echo "bench mb$1 $2: $(grep -h -E "tok/s|FAILED|Error" $OUT/mb$1_$2_*.txt | tail -1) ($(( $(date +%s) - t0 )) s)"
}
train 8 auto; train 8 fa4; train 4 auto; train 4 fa4; bench 8 fa4
for run in "8 auto" "8 fa4" "4 auto" "4 fa4"; do
  [ $(( $(date +%s) - t0 )) -lt 500 ] || break
  train $run
done
kill $smi
echo "total $(( $(date +%s) - t0 )) s"
