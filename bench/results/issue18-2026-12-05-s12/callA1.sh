# Call A1 (twelfth session, late: little session time left): callA.sh's first half alone. The GPU tests of the
# tenth and eleventh sessions' changes, then bf16 micro-batch 8 and 4 with the projections separate, stacked,
# separate again (decides layers.STACK_PROJECTIONS).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout -s INT -k 5 150 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
  -k "stacked or compiled_loss or never_waits or one_graph or one_launch or log_window" > $OUT/gpu_tests.txt 2>&1; tail -n 3 $OUT/gpu_tests.txt
for run in separate stacked separate_again; do
  flag=""; [ "$run" = stacked ] && flag="--stack-projections"
  echo "== $run" >> $OUT/bench.txt
  timeout 110 python bench/fp8.py --modes false --budget 70 $flag >> $OUT/bench.txt 2>&1
  echo "$run: ($(( $(date +%s) - t0 )) s)"; grep -E "tok/s|FAILED|Error" $OUT/bench.txt | tail -n 2
done
echo "total $(( $(date +%s) - t0 )) s"
