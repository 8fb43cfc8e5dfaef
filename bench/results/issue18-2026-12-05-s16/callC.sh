# Call C (sixteenth session), on call B's warm machine (FlashAttention-4 in /tmp/fa4site; carry
# data/fp8-corpus): where the micro-batch-8 step goes with FA4 (profile, synthetic tokens); the gap between
# `threefold train` and the bench path: whether real tokens alone slow the step (the bench path on
# data/fp8-corpus), whether copying the token ids from pageable memory made the host wait (bench/h2d_wait.py,
# and `threefold train` with threefold.train.PIN_HOST_BATCHES on and off); `threefold train` with FA4.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
site=/tmp/fa4site
[ -d $site/flash_attn ] || { echo "no FlashAttention-4 in /tmp: a fresh machine"; exit 3; }
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
python3 bench/h2d_wait.py > $OUT/h2d_wait.txt 2>&1; cat $OUT/h2d_wait.txt
timeout 60 python3 -m pytest -q -m gpu tests/test_gpu.py -k "without_the_host_waiting" -p no:cacheprovider 2>&1 | tail -n 2
echo "($(( $(date +%s) - t0 )) s)"
common="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda
  --training.compile=true --training.micro_batch_size=8 --training.global_batch_size=8 --steps 4 --full-names"
timeout 120 python3 bench/profile_step.py $common --training.attention_backend=fa4 > $OUT/profile8_fa4.txt 2>&1
echo "profile fa4 rc=$? ($(( $(date +%s) - t0 )) s)"
timeout 110 python3 bench/fp8.py --modes false --micro-batches 8 --budget 80 --data data/fp8-corpus \
  > $OUT/mb8_auto_real.txt 2>&1
echo "bench real: $(grep -E "tok/s|FAILED|Error" $OUT/mb8_auto_real.txt | head -3) ($(( $(date +%s) - t0 )) s)"
# PIN_HOST_BATCHES off through a sitecustomize that every Python process of the run imports.
mkdir -p /tmp/nopin && echo "import threefold.train as t; t.PIN_HOST_BATCHES = False" > /tmp/nopin/sitecustomize.py
for run in "auto pinned" "auto pageable" "fa4 pinned"; do
  set -- $run
  [ $(( $(date +%s) - t0 )) -lt 460 ] || break
  dir=/tmp/train8-$1-$2
  extra=""; [ $2 = pageable ] && extra=/tmp/nopin:
  PYTHONPATH=$extra$PYTHONPATH timeout 110 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.attention_backend=$1 --logging.out_dir=$dir > $dir.log 2>&1
  echo "train mb8 $1 $2 rc=$? ($(( $(date +%s) - t0 )) s)"; grep "^done" $dir.log
  cp $dir/metrics.jsonl $OUT/train8-$1-$2.jsonl
done
echo "total $(( $(date +%s) - t0 )) s"
