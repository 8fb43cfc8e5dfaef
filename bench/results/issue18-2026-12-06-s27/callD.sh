# Call D (twenty-seventh session), carry .old (threefold/model/transformer.py and compile_choices.py as at
# 8e0d521: the choices passed only as torch.compile options). The GPU tests of compiled layers; then
# bench/profile_step.py (llama-1b, seq 2048, micro-batch 8, compiled, rowwise + float8 output layer)
# new / old / new / old, and bf16 new / old.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s27d}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
old=/tmp/oldtree
rm -rf $old && mkdir -p $old && cp -r threefold bench $old/ && cp .old/*.py $old/threefold/model/
PYTHONPATH=$PWD timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_fp8.py \
  -k "wide_rows or compiled or compile" --tb=short -p no:logging 2>&1 | grep -vE "DEBUG|^\s*$|warn" \
  | tail -40 | tee "$out/gpu-tests.txt"
echo "tests done ($(( $(date +%s) - t0 )) s)"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.micro_batch_size=8 --training.global_batch_size=8"
fp8="--training.fp8=rowwise --training.fp8_output_layer=true"
i=0
for run in "new $fp8" "old $fp8" "new $fp8" "old $fp8" "new" "old"; do
  [ $(( $(date +%s) - t0 )) -lt 520 ] || break
  set -- $run; tree=$1; shift
  i=$((i + 1)); dir=$PWD; [ $tree = old ] && dir=$old
  (cd $dir && PYTHONPATH=$dir python3 -c "import threefold.model.compile_choices as c; print(c.__file__, 'applied:', hasattr(c, 'applied'))")
  (cd $dir && PYTHONPATH=$dir timeout 150 python3 bench/profile_step.py $args "$@" --steps 4) \
    > "$out/profile_${i}_$tree.txt" 2>&1
  echo "== $i $tree $* rc $? ($(( $(date +%s) - t0 )) s)"; grep -E "^step time|^peak" "$out/profile_${i}_$tree.txt"
done
echo "total $(( $(date +%s) - t0 )) s"
