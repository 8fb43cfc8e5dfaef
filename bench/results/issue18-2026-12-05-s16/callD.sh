# Call D (sixteenth session; carry data/fp8-corpus): the step's figures copied to the host behind the step
# (PendingStats.copy_to_host) against the plain read that waited for everything queued (the old path,
# through a sitecustomize that every Python process of the run imports), `threefold train` at micro-batch
# 8 and 4 on real tokens, interleaved; the bench path at micro-batch 8 for the gap; the GPU tests.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
t0=$(date +%s)
timeout 90 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
  -k "figures_are_read or never_waits or without_the_host or log_window" 2>&1 | tail -n 2
echo "($(( $(date +%s) - t0 )) s)"
mkdir -p /tmp/oldread && cat > /tmp/oldread/sitecustomize.py <<'PY'
import threefold.train as t
t.PendingStats.copy_to_host = lambda self: self  # the read before 2026-12-05: float(loss) on the stream
PY
for run in "8 new" "8 old" "8 new" "8 old" "4 new" "4 old"; do
  set -- $run
  [ $(( $(date +%s) - t0 )) -lt 400 ] || break
  dir=/tmp/train$1-$2-$(date +%s)
  extra=""; [ $2 = old ] && extra=/tmp/oldread:
  PYTHONPATH=$extra$PYTHONPATH timeout 100 python3 -m threefold train bench/fp8_loss.toml \
    --training.max_steps=70 --training.micro_batch_size=$1 --training.global_batch_size=$1 \
    --logging.out_dir=$dir > $dir.log 2>&1
  echo "train mb$1 $2 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" $dir.log)"
  cp $dir/metrics.jsonl $OUT/$(basename $dir).jsonl
done
timeout 80 python3 bench/fp8.py --modes false --micro-batches 8 --budget 60 > $OUT/mb8_bench.txt 2>&1
echo "bench: $(grep -E "tok/s|FAILED|Error" $OUT/mb8_bench.txt | head -2)"
echo "total $(( $(date +%s) - t0 )) s"
