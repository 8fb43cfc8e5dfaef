# Call E (twenty-seventh session), carry .old (threefold/model/loss.py, threefold/parallel/fp8.py and
# fp8_gather.py as at e9cc426^: before fp8.amax and the eager one-pass row cast, laid out as .old/model/
# and .old/parallel/). The float8 GPU tests; then bench/profile_step.py (llama-1b, seq 2048, micro-batch 8,
# rowwise + float8 output layer) compiled new / old / new / old, then eager (compile off) new / old; each
# run prints which fp8.py it imported, and the profile's kernels the changes touch. BUDGET_S: no new run
# starts after that many seconds (default 500).
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s27e}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
old=/tmp/oldtree
rm -rf $old && mkdir -p $old && cp -r threefold bench $old/ && cp .old/model/*.py $old/threefold/model/ \
  && cp .old/parallel/*.py $old/threefold/parallel/
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -m gpu tests/test_gpu_fp8.py tests/test_fp8_output_layer.py \
  --tb=short -p no:logging 2>&1 | grep -E "passed|failed|^E |FAILED" | tail -20 | tee "$out/gpu-tests.txt"
echo "tests done ($(( $(date +%s) - t0 )) s)"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.micro_batch_size=8 --training.global_batch_size=8 --training.fp8=rowwise \
 --training.fp8_output_layer=true"
i=0
for run in "new true" "old true" "new true" "old true" "new false" "old false"; do
  [ $(( $(date +%s) - t0 )) -lt ${BUDGET_S:-500} ] || break
  set -- $run; tree=$1; compiled=$2
  i=$((i + 1)); dir=$PWD; [ $tree = old ] && dir=$old
  (cd $dir && PYTHONPATH=$dir python3 -c "import threefold.parallel.fp8 as f; print(f.__file__, 'amax:', hasattr(f, 'amax'))")
  (cd $dir && PYTHONPATH=$dir timeout 150 python3 bench/profile_step.py $args --training.compile=$compiled \
    --steps 4 --top 90) > "$out/profile_${i}_${tree}_compile-$compiled.txt" 2>&1
  echo "== $i $tree compile=$compiled rc $? ($(( $(date +%s) - t0 )) s)"
  grep -E "^step time|^peak|AbsFunctor|aminmax|MinMax|reduce_kernel|transposed_cast|clamp|Mul|copy_kernel|^\| other" \
    "$out/profile_${i}_${tree}_compile-$compiled.txt"
done
echo "total $(( $(date +%s) - t0 )) s"
