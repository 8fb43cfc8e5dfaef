# Call A (sixteenth session): carries the first part of FlashAttention-4's packages (`.fa4a`, see
# ../issue18-2026-12-05-s15/README.md) and keeps it in the machine's /tmp for call B; a bf16 micro-batch-8
# baseline with torch's attention.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
mkdir -p /tmp/fa4parts && cp .fa4a/part /tmp/fa4parts/a && ls -la /tmp/fa4parts
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv
python3 -c "import torch; print(torch.__version__, torch.backends.cudnn.version())"
timeout 200 python3 bench/fp8.py --modes false --micro-batches 8 --budget 90 > $OUT/mb8_auto_a.txt 2>&1
grep -E "tok/s|FAILED|Error" $OUT/mb8_auto_a.txt
echo "total $(( $(date +%s) - t0 )) s"
