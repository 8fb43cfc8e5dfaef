# Call G (fourteenth session): Python's collector on the loop's schedule (training.gc_interval, new) against
# the automatic collector, through `threefold train` on real tokens (carry data/fp8-corpus), bf16, llama-1b,
# micro-batch 4 (the shorter step, where a host pause shows most), 120 steps, logged every step,
# interleaved twice. Predicted: the median step the same (a pause shorter than the queued work hides behind
# it), the mean and the slowest steps lower if the automatic collector's full collections land in the loop.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
for gc in 0 50 0 50; do
  run=/tmp/gc-$gc-$(date +%s)
  timeout 150 python -m threefold train bench/fp8_loss.toml --training.max_steps=120 \
    --training.micro_batch_size=4 --training.global_batch_size=4 --training.gc_interval=$gc \
    --logging.out_dir=$run > $run.log 2>&1
  echo "gc_interval $gc rc=$? ($(( $(date +%s) - t0 )) s)"; tail -n 1 $run.log
  python - $run/metrics.jsonl $gc >> $OUT/gc.txt <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
steps = [r for r in rows if "perf/step_seconds" in r and r["step"] > 10]
s = [r["perf/step_seconds"] for r in steps]
tokens = 4 * 2048
print(f"gc_interval {sys.argv[2]}: steps 11-{steps[-1]['step']}: median {tokens / statistics.median(s):,.0f} "
      f"tokens/s, mean {tokens * len(s) / sum(s):,.0f}, slowest {max(s) * 1e3:.1f} ms, "
      f"fastest {min(s) * 1e3:.1f} ms, peak {steps[-1].get('perf/peak_memory_gib', 0):.1f} GiB")
PY
  tail -n 1 $OUT/gc.txt; cp $run/metrics.jsonl $OUT/gc-$gc-$(( $(date +%s) - t0 )).jsonl
done
echo "total $(( $(date +%s) - t0 )) s"
