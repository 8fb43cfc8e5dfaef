# Call C (sixteenth session), on call B's warm machine (FlashAttention-4 in /tmp/fa4site; carry
# data/fp8-corpus): where the micro-batch-8 step goes with FA4 (profile, synthetic tokens); whether real
# tokens alone slow the step (the bench path on data/fp8-corpus, and a profile on its tokens), the gap
# between `threefold train` and the bench path; then `threefold train` at micro-batch 8 with FA4 and without.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
site=/tmp/fa4site
[ -d $site/flash_attn ] || { echo "no FlashAttention-4 in /tmp: a fresh machine"; exit 3; }
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
common="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda
  --training.compile=true --training.micro_batch_size=8 --training.global_batch_size=8 --steps 4 --full-names"
timeout 120 python3 bench/profile_step.py $common --training.attention_backend=fa4 > $OUT/profile8_fa4.txt 2>&1
echo "profile fa4 rc=$? ($(( $(date +%s) - t0 )) s)"
timeout 120 python3 bench/profile_step.py $common --data.path=data/fp8-corpus --real-tokens \
  > $OUT/profile8_auto_real.txt 2>&1
echo "profile auto real rc=$? ($(( $(date +%s) - t0 )) s)"
timeout 110 python3 bench/fp8.py --modes false --micro-batches 8 --budget 80 --data data/fp8-corpus \
  > $OUT/mb8_auto_real.txt 2>&1
echo "bench real: $(grep -E "tok/s|FAILED|Error" $OUT/mb8_auto_real.txt | head -3) ($(( $(date +%s) - t0 )) s)"
for backend in fa4 auto; do
  [ $(( $(date +%s) - t0 )) -lt 440 ] || break
  run=/tmp/train8-$backend
  timeout 110 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.attention_backend=$backend --logging.out_dir=$run > $run.log 2>&1
  echo "train mb8 $backend rc=$? ($(( $(date +%s) - t0 )) s)"; grep "^done" $run.log
  cp $run/metrics.jsonl $OUT/train8-$backend.jsonl
done
echo "total $(( $(date +%s) - t0 )) s"
