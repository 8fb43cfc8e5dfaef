# Call F (fourteenth session): the thirteenth session's callD.sh (is triton.multi_kernel=1 worth turning on?
# default and multi-kernel interleaved twice, bf16 and rowwise micro-batch 8), then from the twelfth
# session's callC.sh the llama-8b-width bf16 against rowwise (what float8 gives a wider model) and, time
# left, the rowwise micro-batch-8 profile.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm,clocks_event_reasons.active --format=csv -lms 500 \
  > $OUT/power.csv 2>&1 &
query=$!
bash bench/results/issue18-2026-12-05-s13/callD.sh
echo "($(( $(date +%s) - t0 )) s)"
timeout 200 python bench/fp8.py --model llama-8b --num-layers 8 --modes false,rowwise --micro-batches 4 \
  --budget 120 > $OUT/w8.txt 2>&1; grep -E "tok/s|FAILED|Error" $OUT/w8.txt
echo "($(( $(date +%s) - t0 )) s)"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true"
[ $(( $(date +%s) - t0 )) -lt 440 ] && timeout 120 python bench/profile_step.py $args --training.micro_batch_size=8 \
  --training.global_batch_size=8 --training.fp8=rowwise --steps 4 --full-names > $OUT/rowwise_profile.txt 2>&1
sed -n 3,7p $OUT/rowwise_profile.txt
kill $query
echo "total $(( $(date +%s) - t0 )) s"
