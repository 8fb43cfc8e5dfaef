# Call 3: fp8 tensorwise micro-batch 8, the working tree (the linear keeps x) against variant_tree/ (the
# same code but for fp8._Fp8Linear keeping x's float8 copy from the forward); then bench/fp8.py, the
# headline, from whichever stepped faster.
export PYTHONUNBUFFERED=1
F="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true"
M8="$F --training.micro_batch_size=8 --training.global_batch_size=8 --training.fp8=tensorwise"
declare -A ms
for tree in . variant_tree; do
  name=$([ $tree = . ] && echo keep_x || echo keep_fp8_x)
  (cd $tree && PYTHONPATH=$PWD timeout 150 python bench/profile_step.py $M8 --steps 6 > $OUT/$name.txt 2>&1)
  echo "== $name rc $?"; grep -E "^step time|^peak|^torch.compile" $OUT/$name.txt | cut -c1-120
  ms[$tree]=$(grep -oP "^step time without the profiler: \K[0-9.]+" $OUT/$name.txt)
done
win=$(python3 -c "print('.' if float('${ms[.]}' or 1e9) <= float('${ms[variant_tree]}' or 1e9) else 'variant_tree')")
echo "headline from: $win"
(cd $win && PYTHONPATH=$PWD timeout 330 python bench/fp8.py --budget 150 2>&1 | grep -v "Warn\|warn_once" | tail -14)
