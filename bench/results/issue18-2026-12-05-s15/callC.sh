# Call C (fifteenth session), on call B's warm machine (carry .fa4b and data/fp8-corpus; call A's part
# waits in /tmp): bf16 micro-batch 8 again in the other order (fa4 first), micro-batch 4 both ways,
# then `threefold train` on real tokens at micro-batch 4 (the issue's headline path), torch's attention and
# FA4, 80 steps each, logged every step.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
# The repository's ignored files do not outlive a call; /tmp does, on a warm machine.
site=/tmp/fa4site
if [ ! -d $site/flash_attn ]; then
  [ -s /tmp/fa4parts/a ] || { echo "call A's part is not here: a fresh machine"; exit 3; }
  mkdir -p $site && cat /tmp/fa4parts/a .fa4b/part | xz -d | tar -C $site -xf - || exit 4
fi
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py -k fa4 -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1; tail -n 2 $OUT/gpu_tests.txt
for run in "8 fa4" "8 auto" "4 auto" "4 fa4"; do
  set -- $run
  timeout 120 python3 bench/fp8.py --modes false --micro-batches $1 --budget 90 --attention-backend $2 \
    > $OUT/mb$1_$2_c.txt 2>&1
  echo "$2: $(grep -E "tok/s|FAILED|Error" $OUT/mb$1_$2_c.txt | head -3) ($(( $(date +%s) - t0 )) s)"
done
for backend in auto fa4; do
  [ $(( $(date +%s) - t0 )) -lt 470 ] || break
  run=/tmp/train-$backend
  timeout 120 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=80 \
    --training.micro_batch_size=4 --training.global_batch_size=4 --training.attention_backend=$backend \
    --logging.out_dir=$run > $run.log 2>&1
  echo "train $backend rc=$? ($(( $(date +%s) - t0 )) s)"; tail -n 2 $run.log
  python3 - $run/metrics.jsonl $backend >> $OUT/train.txt <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
steps = [r for r in rows if "perf/step_seconds" in r and r["step"] > 10]
s = [r["perf/step_seconds"] for r in steps]
losses = [r["train/loss"] for r in rows if "train/loss" in r]
tokens = 4 * 2048
print(f"{sys.argv[2]}: steps 11-{steps[-1]['step']}: median {tokens / statistics.median(s):,.0f} tokens/s, "
      f"mean {tokens * len(s) / sum(s):,.0f}, peak {steps[-1].get('perf/peak_memory_gib', 0):.1f} GiB, "
      f"loss first {losses[0]:.4f} last {losses[-1]:.4f}")
PY
  tail -n 1 $OUT/train.txt; cp $run/metrics.jsonl $OUT/train-$backend.jsonl
done
echo "total $(( $(date +%s) - t0 )) s"
