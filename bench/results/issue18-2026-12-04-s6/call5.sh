# Call 5: is the fp8 loss shift of call 4 the kernel's? The compiled model with the Triton transposed cast
# against torch's cast (GPU test), then 100 steps of threefold train on the loss guard's data: bf16, fp8
# tensorwise with the kernel (working tree, scale no longer expanded), fp8 with torch's cast (variant_tree/).
export PYTHONUNBUFFERED=1
timeout 120 env PYTHONPATH=$PWD python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_fp8.py -k "kernel_as_with_torch or transposed_cast_kernel" 2>&1 | grep -E "passed|failed|^E .*(Error|assert)" | head -8
train() {  # name tree fp8
  local root=$PWD
  (cd $2 && PYTHONPATH=$PWD timeout 130 python -m threefold train $root/bench/fp8_loss.toml --training.max_steps=100 \
    --training.fp8=$3 --data.path=$root/data/fp8-corpus --logging.out_dir=/tmp/run-$1 > $OUT/$1.log 2>&1)
  echo "== $1 rc $?"; tail -1 $OUT/$1.log; cp /tmp/run-$1/metrics.jsonl $OUT/$1.jsonl
}
train bf16 . false
train kernel . tensorwise
train torch_cast variant_tree tensorwise
