# Call A (twenty-sixth session), carry .tt and data/fp8-corpus. First, on any card, the GPU test that sets
# the float8 GEMMs against the CPU's (tensorwise skipped on torch 2.11 until fp8.matmul checked which
# scales this torch's CPU _scaled_mm takes). Then, on an H200: the side by side with TorchTitan v0.2.2
# (`bash bench/torchtitan_side_by_side.sh "8 4"`, bf16; the issue's targets are H200 figures, none measured
# since the fourteenth session) and, with the time left, `threefold train` rowwise + float8 output layer at
# micro-batches 8 and 4. On any other card: for the planner's element-wise rates, bench/profile_step.py at
# micro-batch 4, bf16 and rowwise + output layer.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s26a}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
PYTHONPATH=$PWD timeout 120 python3 -m pytest -q -m gpu tests/test_gpu_fp8.py -k "compute_what" -rs \
  2>&1 | tail -4 | tee "$out/gpu-tests.txt"
fp8="--training.fp8=rowwise --training.fp8_output_layer=true"
case "$(cat "$out/card.txt")" in
  *H200*)
    nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
    smi=$!
    OUT=$out bash bench/torchtitan_side_by_side.sh "8 4"
    for mb in 8 4; do
      [ $(( $(date +%s) - t0 )) -lt 480 ] || break
      dir=/tmp/fp8train$mb
      PYTHONPATH=$PWD timeout 110 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
        --training.micro_batch_size=$mb --training.global_batch_size=$mb $fp8 --logging.out_dir=$dir \
        > "$out/fp8train$mb.log" 2>&1
      echo "threefold rowwise + output micro-batch $mb rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$out/fp8train$mb.log")"
      cp $dir/metrics.jsonl "$out/fp8train$mb.jsonl"
    done
    kill $smi ;;
  *)
    args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.micro_batch_size=4 --training.global_batch_size=4"
    for mode in bf16 rowwise; do
      extra=""; [ $mode = rowwise ] && extra=$fp8
      PYTHONPATH=$PWD timeout 150 python3 bench/profile_step.py $args $extra --steps 4 > "$out/profile4_$mode.txt" 2>&1
      echo "== $mode rc $? ($(( $(date +%s) - t0 )) s)"; grep -E "^step time|^peak" "$out/profile4_$mode.txt"
    done ;;
esac
echo "total $(( $(date +%s) - t0 )) s"
