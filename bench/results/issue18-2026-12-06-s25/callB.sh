# Call B (twenty-fifth session), carry .old (the output layer's loss.py and _loss_kernels.py as at
# 5a26751): the float8 output layer's logits on the one-scale kernel, their scales applied in the loss's
# Triton kernels (new), against the row-scaled kernel (old), on one machine. The GPU test of the output
# layer; then bench/profile_step.py (llama-1b, seq 2048, micro-batch 8, compiled, rowwise + output layer)
# new, old, new. Call C (callC.sh) runs both through `threefold train`.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s25b}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
old=/tmp/oldtree
rm -rf $old && mkdir -p $old && cp -r threefold bench $old/ && cp .old/*.py $old/threefold/model/
PYTHONPATH=$PWD python3 -m pytest -q -m gpu tests/test_gpu_fp8.py -k output_layer 2>&1 | tail -3 \
  | tee "$out/gpu-tests.txt"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.micro_batch_size=8 --training.global_batch_size=8 --training.fp8=rowwise \
 --training.fp8_output_layer=true"
i=0
for tree in new old new; do
  i=$((i + 1)); dir=$PWD; [ $tree = old ] && dir=$old
  (cd $dir && PYTHONPATH=$dir timeout 150 python3 bench/profile_step.py $args --steps 4) \
    > "$out/profile_${i}_$tree.txt" 2>&1
  echo "== $i $tree rc $? ($(( $(date +%s) - t0 )) s)"; grep -E "^step time|^peak" "$out/profile_${i}_$tree.txt"
done
echo "total $(( $(date +%s) - t0 )) s"
