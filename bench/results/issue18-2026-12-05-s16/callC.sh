# Call C (sixteenth session), on call B's warm machine (FlashAttention-4 in /tmp/fa4site; carry
# data/fp8-corpus): where the micro-batch-8 step goes with FA4 and with torch's attention (profiles), then
# `threefold train` at micro-batch 8 on real tokens both ways.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
site=/tmp/fa4site
[ -d $site/flash_attn ] || { echo "no FlashAttention-4 in /tmp: a fresh machine"; exit 3; }
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
for backend in fa4 auto; do
  timeout 130 python3 bench/profile_step.py --model.preset=llama-1b --data.seq_len=2048 \
    --training.dtype=bfloat16 --training.device=cuda --training.compile=true --training.micro_batch_size=8 \
    --training.global_batch_size=8 --training.attention_backend=$backend --steps 4 --full-names \
    > $OUT/profile8_$backend.txt 2>&1
  echo "profile $backend rc=$? ($(( $(date +%s) - t0 )) s)"; grep -E "ms a step|busy" $OUT/profile8_$backend.txt | head -4
done
for backend in fa4 auto; do
  [ $(( $(date +%s) - t0 )) -lt 420 ] || break
  run=/tmp/train8-$backend
  timeout 110 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.attention_backend=$backend --logging.out_dir=$run > $run.log 2>&1
  echo "train mb8 $backend rc=$? ($(( $(date +%s) - t0 )) s)"; grep "^done" $run.log
  cp $run/metrics.jsonl $OUT/train8-$backend.jsonl
done
echo "total $(( $(date +%s) - t0 )) s"
