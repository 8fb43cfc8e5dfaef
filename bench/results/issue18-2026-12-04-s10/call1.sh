# Call 1 (not run yet: no device was lent in the tenth session). The GPU tests of the tenth session's
# changes; bf16 through bench/fp8.py, micro-batch 8 and 4, with q/k/v and gate/up as separate GEMMs, then
# stacked (layers.STACK_PROJECTIONS via --stack-projections), then separate again (run-to-run spread);
# rowwise at micro-batch 8 with the shared input casts, and without them: the tree before them (934ebd1,
# `git archive 934ebd1 -o data/old.tar` on the dev machine, carried), run with this bench/fp8.py.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout -s INT -k 5 170 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
  -k "stacked or compiled_loss or never_waits or one_graph or one_launch or log_window" > $OUT/gpu_tests.txt 2>&1; tail -n 2 $OUT/gpu_tests.txt
for run in separate stacked separate_again; do
  flag=""; [ "$run" = stacked ] && flag="--stack-projections"
  timeout 130 python bench/fp8.py --modes false --budget 90 $flag > $OUT/$run.txt 2>&1
  echo "$run:"; grep -E "tok/s|FAILED|Error" $OUT/$run.txt
done
timeout 100 python bench/fp8.py --modes rowwise --micro-batches 8 --budget 60 > $OUT/rowwise.txt 2>&1
echo "rowwise, shared casts:"; grep -E "tok/s|FAILED|Error" $OUT/rowwise.txt
mkdir -p /tmp/old && tar -xf data/old.tar -C /tmp/old && cp bench/fp8.py /tmp/old/bench/
(cd /tmp/old && PYTHONPATH=/tmp/old timeout 100 python bench/fp8.py --modes rowwise --micro-batches 8 --budget 60 \
  > $OUT/rowwise_old.txt 2>&1); echo "rowwise, a cast per projection:"; grep -E "tok/s|FAILED|Error" $OUT/rowwise_old.txt
