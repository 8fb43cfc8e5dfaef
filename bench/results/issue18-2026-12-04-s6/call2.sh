# Call 2: 42fa756 (old_tree/) against the working tree (no graph break in the layer; fp8 changes), bf16
# micro-batch 4 and fp8 tensorwise micro-batch 8, each in one process with the profiler; then GPU tests.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
F="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true"
M4="$F --training.micro_batch_size=4 --training.global_batch_size=4 --training.fp8=false"
M8="$F --training.micro_batch_size=8 --training.global_batch_size=8 --training.fp8=tensorwise"
for run in "old bf16_4 $M4" "new bf16_4 $M4" "old fp8_8 $M8" "new fp8_8 $M8"; do
  set -- $run; tree=$1; name=$2; shift 2
  dir=.; [ $tree = old ] && dir=old_tree
  (cd $dir && PYTHONPATH=$PWD timeout 150 python bench/profile_step.py "$@" --steps 6 > $OUT/${tree}_$name.txt 2>&1)
  echo "== $tree $name rc $?"; grep -E "^step time|^peak|^torch.compile" $OUT/${tree}_$name.txt | cut -c1-150
  grep -E "elementwise_kernel<128, 4" $OUT/${tree}_$name.txt | tail -1 | cut -c90-
done
timeout 200 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_fp8.py tests/test_gpu.py -k "not graphed" > $OUT/gpu_tests.txt 2>&1; echo "tests rc $?"; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.txt | head; tail -1 $OUT/gpu_tests.txt
