# Call D (twenty-fifth session), carry .old (threefold/parallel/fp8.py and _fp8_kernel.py as at 27d4f73):
# the float8 transposed cast reading its per-row or per-column scale as one vector a tile (new, commit in
# the README) against the element-by-element read (old), one machine. The GPU test of the kernel (bit for
# bit against torch's cast), then bench/profile_step.py (llama-1b, seq 2048, micro-batch 8, compiled,
# rowwise + output layer) new, old, new, old; then, for the planner, a bf16 profile of the same step.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s25d}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
old=/tmp/oldtree
rm -rf $old && mkdir -p $old && cp -r threefold bench $old/ && cp .old/*.py $old/threefold/parallel/
PYTHONPATH=$PWD python3 -m pytest -q -m gpu tests/test_gpu_fp8.py -k "transposed_cast or output_layer or compute_what" \
  2>&1 | tail -3 | tee "$out/gpu-tests.txt"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.micro_batch_size=8 --training.global_batch_size=8"
fp8="--training.fp8=rowwise --training.fp8_output_layer=true"
i=0
for tree in new old new old; do
  i=$((i + 1)); dir=$PWD; [ $tree = old ] && dir=$old
  (cd $dir && PYTHONPATH=$dir python3 -c "import threefold.parallel._fp8_kernel as k; print(k.__file__, 'vector scale read:', 'SCALE_ALONG' in open(k.__file__).read())")
  (cd $dir && PYTHONPATH=$dir timeout 150 python3 bench/profile_step.py $args $fp8 --steps 4) \
    > "$out/profile_${i}_$tree.txt" 2>&1
  echo "== $i $tree rc $? ($(( $(date +%s) - t0 )) s)"; grep -E "^step time|^peak|^\| transposed_cast_kernel" "$out/profile_${i}_$tree.txt"
done
[ $(( $(date +%s) - t0 )) -lt 420 ] && PYTHONPATH=$PWD timeout 150 python3 bench/profile_step.py $args --steps 4 \
  > "$out/profile_bf16.txt" 2>&1; grep -E "^step time|^peak" "$out/profile_bf16.txt"
echo "total $(( $(date +%s) - t0 )) s"
