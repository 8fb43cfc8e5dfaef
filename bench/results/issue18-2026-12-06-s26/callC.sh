# Call C (twenty-sixth session), carry .old (threefold/model/loss.py and _loss_kernels.py as at bf652e9),
# .tt and data/fp8-corpus. On an H200, call A (the side by side with TorchTitan, then rowwise + float8
# output layer through `threefold train`). On any other card: the GPU tests of the wide-row reductions and
# of the float8 output layer; then the output layer's weight-gradient products summed in one pass (new)
# against the fp32 sum in three (old), bench/profile_step.py (llama-1b, seq 2048, micro-batch 8, compiled,
# rowwise + float8 output layer) new / old / new / old; then, with the time left, `threefold train
# bench/fp8_loss.toml` (real tokens, 70 steps, micro-batch 8) in bf16 and in rowwise + float8 output layer.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s26c}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
case "$(cat "$out/card.txt")" in *H200*) OUT=$out bash bench/results/issue18-2026-12-06-s26/callA.sh; exit ;; esac
old=/tmp/oldtree
rm -rf $old && mkdir -p $old && cp -r threefold bench $old/ && cp .old/*.py $old/threefold/model/
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_fp8.py \
  -k "wide_rows or output_layer" --tb=line -p no:logging 2>&1 | grep -vE "DEBUG|^\s*$" | tail -8 | tee "$out/gpu-tests.txt"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.micro_batch_size=8 --training.global_batch_size=8"
fp8="--training.fp8=rowwise --training.fp8_output_layer=true"
i=0
for tree in new old new old; do
  i=$((i + 1)); dir=$PWD; [ $tree = old ] && dir=$old
  (cd $dir && PYTHONPATH=$dir python3 -c "import threefold.model.loss as l; print(l.__file__, 'one-pass sum:', '_scaled_sum' in open(l.__file__).read())")
  (cd $dir && PYTHONPATH=$dir timeout 150 python3 bench/profile_step.py $args $fp8 --steps 4) \
    > "$out/profile_${i}_$tree.txt" 2>&1
  echo "== $i $tree rc $? ($(( $(date +%s) - t0 )) s)"; grep -E "^step time|^peak|scaled_sum_kernel" "$out/profile_${i}_$tree.txt"
done
for mode in rowwise bf16; do
  [ $(( $(date +%s) - t0 )) -lt 450 ] || break
  extra=""; [ $mode = rowwise ] && extra=$fp8
  dir=/tmp/train-$mode-$(date +%s)
  PYTHONPATH=$PWD timeout 110 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    $extra --logging.out_dir=$dir > "$dir.log" 2>&1
  echo "threefold $mode micro-batch 8 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$dir.log")" | tee -a "$out/train.txt"
  cp $dir/metrics.jsonl "$out/$(basename $dir).jsonl"
done
echo "total $(( $(date +%s) - t0 )) s"
