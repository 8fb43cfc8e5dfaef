# Call A (seventeenth session): carries the first part of FlashAttention-4's packages (`.fa4a`, see
# ../issue18-2026-12-05-s15/README.md) and keeps it in the machine's /tmp for call B; the GPU tests of the
# log read and the token copy (not run since 4acb199's refactor); the bench path in bf16 with torch's
# attention at micro-batch 8 and 4, the card's power and clock logged every 500 ms.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
mkdir -p /tmp/fa4parts && cp .fa4a/part /tmp/fa4parts/a && ls -la /tmp/fa4parts
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv
python3 -c "import torch; print(torch.__version__, torch.backends.cudnn.version())"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv -lms 500 > $OUT/power.csv 2>&1 &
smi=$!
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
  -k "figures_are_read or never_waits or without_the_host or log_window" > $OUT/gpu_tests.txt 2>&1
tail -n 3 $OUT/gpu_tests.txt; echo "($(( $(date +%s) - t0 )) s)"
for mb in 8 4 8; do
  timeout 150 python3 bench/fp8.py --modes false --micro-batches $mb --budget 90 > $OUT/mb${mb}_auto_$(date +%s).txt 2>&1
  echo "mb$mb auto: $(grep -h -E "tok/s|FAILED|Error" $OUT/mb${mb}_auto_*.txt | tail -1) ($(( $(date +%s) - t0 )) s)"
done
kill $smi
echo "total $(( $(date +%s) - t0 )) s"
