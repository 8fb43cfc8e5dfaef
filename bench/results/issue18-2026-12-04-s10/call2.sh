# Call 2 (not run yet). `threefold train` on the loss guard's corpus (carry data/fp8-corpus), bf16,
# micro-batch 8, 100 steps at log_interval 1: the loop reading each step's loss while the next one runs
# (the default since the tenth session), then reading it at once (what reliability.spike_rollback = true
# makes the loop do: a rollback must come before the next step), then rowwise with the late read.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/late $OUT/now
OUT=$OUT/late MODES="false rowwise" SEED=1234 bash bench/fp8_loss.sh --training.max_steps=100 2>&1 | grep -E "rc=|Error"
OUT=$OUT/now MODES="false" SEED=1234 bash bench/fp8_loss.sh --training.max_steps=100 \
  --reliability.spike_rollback=true 2>&1 | grep -E "rc=|Error"
python -c "import statistics, sys; sys.path.insert(0, 'bench'); from pathlib import Path; from fp8_loss_plot import read_run
for p in sys.argv[1:]:
    run = read_run(Path(p)); speed = list(run['perf/tokens_per_s_per_device'].values())[10:]
    print(p, f'median {statistics.median(speed):,.0f} tokens/s, peak', max(run['perf/peak_memory_gib'].values()))" $OUT/*/*.jsonl
rm -f $OUT/*/*.log  # six files at most come back; keep the metrics
