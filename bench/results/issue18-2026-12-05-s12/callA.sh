# Call A (twelfth session, 2026-12-05): the tenth session's call1.sh and call2.sh in one device call, their
# text output gathered in fewer files (the tool returns 8). carry: data/old.tar (git archive 934ebd1), data/fp8-corpus.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
bash "$(dirname "$0")/callA1.sh"  # the GPU tests; bf16 with the projections separate, stacked, separate again
echo "== rowwise, shared casts" >> $OUT/bench.txt
timeout 100 python bench/fp8.py --modes rowwise --micro-batches 8 --budget 60 >> $OUT/bench.txt 2>&1
echo "rowwise, shared casts:"; grep -E "tok/s|FAILED|Error" $OUT/bench.txt | tail -n 1
mkdir -p /tmp/old && tar -xf data/old.tar -C /tmp/old && cp bench/fp8.py /tmp/old/bench/
echo "== rowwise, 934ebd1" >> $OUT/bench.txt
(cd /tmp/old && PYTHONPATH=/tmp/old timeout 100 python bench/fp8.py --modes rowwise --micro-batches 8 --budget 60 \
  >> $OUT/bench.txt 2>&1); echo "rowwise, a cast per projection ($(( $(date +%s) - t0 )) s):"; grep -E "tok/s|FAILED|Error" $OUT/bench.txt | tail -n 1
# call2: threefold train, bf16 mb8, 100 steps at log_interval 1, late read (default) vs at once (spike_rollback).
mkdir -p $OUT/late $OUT/now
OUT=$OUT/late MODES="false" SEED=1234 bash bench/fp8_loss.sh --training.max_steps=100 2>&1 | grep -E "rc=|Error|tokens/s"
OUT=$OUT/now MODES="false" SEED=1234 bash bench/fp8_loss.sh --training.max_steps=100 \
  --reliability.spike_rollback=true 2>&1 | grep -E "rc=|Error|tokens/s"
if [ $(( $(date +%s) - t0 )) -lt 440 ]; then
  OUT=$OUT/late MODES="rowwise" SEED=1234 bash bench/fp8_loss.sh --training.max_steps=100 2>&1 | grep -E "rc=|Error|tokens/s"
fi
python -c "import statistics, sys; sys.path.insert(0, 'bench'); from pathlib import Path; from fp8_loss_plot import read_run
for p in sys.argv[1:]:
    run = read_run(Path(p)); speed = list(run['perf/tokens_per_s_per_device'].values())[10:]
    print(p, f'median {statistics.median(speed):,.0f} tokens/s, peak', max(run['perf/peak_memory_gib'].values()))" $OUT/*/*.jsonl
rm -f $OUT/*/*.log
echo "total $(( $(date +%s) - t0 )) s"
