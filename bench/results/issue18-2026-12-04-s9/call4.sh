# Call 4: the loss's Triton kernels: GPU tests, the chunk against torch.compile's kernels, and bf16 through
# bench/fp8.py against the tree before them (5e6aa87, from `git archive`), in one call.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 200 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "compiled_loss or direct or never_waits" > $OUT/gpu_tests.txt 2>&1; tail -3 $OUT/gpu_tests.txt
timeout 100 python bench/step_kernels.py > $OUT/step_kernels.txt 2>&1; grep -v Warn $OUT/step_kernels.txt | tail -8
timeout 130 python bench/fp8.py --modes false --budget 100 > $OUT/new_bf16.txt 2>&1; grep -E "tok/s|FAILED" $OUT/new_bf16.txt
mkdir -p /tmp/old && tar -xf data/old.tar -C /tmp/old
(cd /tmp/old && PYTHONPATH=/tmp/old timeout 130 python bench/fp8.py --modes false --budget 100 > $OUT/old_bf16.txt 2>&1); grep -E "tok/s|FAILED" $OUT/old_bf16.txt
timeout 130 python bench/fp8.py --modes false --budget 100 > $OUT/new_bf16_again.txt 2>&1; grep -E "tok/s|FAILED" $OUT/new_bf16_again.txt
