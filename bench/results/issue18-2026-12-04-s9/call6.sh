# Call 6 (branch fused-projections, d4fbae2): bf16 micro-batch 8 with q/k/v and gate/up stacked into one GEMM
# each, then the tree without it (main, 5e077a0, from `git archive`, run with this bench/fp8.py).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 50 python bench/fp8.py --modes false --micro-batches 8 --steps 20 --budget 5 > $OUT/new.txt 2>&1; grep -E "tok/s|FAILED|Error" $OUT/new.txt
mkdir -p /tmp/old && tar -xf data/old.tar -C /tmp/old && cp bench/fp8.py /tmp/old/bench/
(cd /tmp/old && PYTHONPATH=/tmp/old timeout 50 python bench/fp8.py --modes false --micro-batches 8 --steps 20 --budget 5 > $OUT/old.txt 2>&1); grep -E "tok/s|FAILED|Error" $OUT/old.txt
