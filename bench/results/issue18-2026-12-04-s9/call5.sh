# Call 5 (at the commit of this file): the one-pass AdamW kernel's block size and warps; `threefold train`
# on the loss guard's text, bf16 and rowwise, micro-batch 8 (100 steps) and 4 (60 steps); the GPU tests.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 90 python bench/adamw_blocks.py > $OUT/adamw_blocks.txt 2>&1; tail -9 $OUT/adamw_blocks.txt
mkdir -p $OUT/mb8 $OUT/mb4
OUT=$OUT/mb8 MODES="false rowwise" SEED=1234 bash bench/fp8_loss.sh --training.max_steps=100 2>&1 | grep -E "rc=|Error"
timeout -s INT -k 5 250 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu_fp8.py tests/test_gpu.py \
  -k "not graphed" > "$OUT/gpu_tests.txt" 2>&1; echo "gpu tests rc=$?"; tail -n 4 "$OUT/gpu_tests.txt"
OUT=$OUT/mb4 MODES="false rowwise" SEED=1234 bash bench/fp8_loss.sh --training.max_steps=60 --training.micro_batch_size=4 --training.global_batch_size=4 2>&1 | grep -E "rc=|Error"
rm -f $OUT/mb8/*.log.x
