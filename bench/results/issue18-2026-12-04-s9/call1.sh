# Call 1: direct gradients on the GPU (tests, then bf16 against the tree before them, 55bbca5), the
# attention kernels side by side, rowwise with direct gradients.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,driver_version --format=csv,noheader
timeout 200 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "direct or never_waits" > $OUT/gpu_tests.txt 2>&1; tail -3 $OUT/gpu_tests.txt
timeout 90 python bench/attention_kernels.py > $OUT/attention.txt 2>&1; grep -v Warning $OUT/attention.txt | tail -9
timeout 130 python bench/fp8.py --modes false --budget 100 > $OUT/new_bf16.txt 2>&1; grep -E "tok/s|FAILED" $OUT/new_bf16.txt
mkdir -p /tmp/old && tar -xf data/old.tar -C /tmp/old && cp bench/fp8.py /tmp/old/bench/
(cd /tmp/old && PYTHONPATH=/tmp/old timeout 130 python bench/fp8.py --modes false --budget 100 > $OUT/old_bf16.txt 2>&1); grep -E "tok/s|FAILED" $OUT/old_bf16.txt
timeout 130 python bench/fp8.py --modes rowwise --budget 100 > $OUT/new_rowwise.txt 2>&1; grep -E "tok/s|FAILED" $OUT/new_rowwise.txt
