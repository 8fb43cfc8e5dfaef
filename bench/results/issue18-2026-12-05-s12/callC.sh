# Call C (twelfth session): the diagnostics (the tenth session's call5 part 1, call3 parts 1 and 3, call4):
# the float8 transposed cast's tile sweep; llama-8b width bf16 against rowwise (the planner's fp8 model off
# its fitted width); a profile of rowwise micro-batch 8 with the compiler's code; a profile of bf16 micro-batch 4.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout 150 python bench/transposed_cast_tiles.py > $OUT/cast_tiles.txt 2>&1; tail -n 20 $OUT/cast_tiles.txt
echo "($(( $(date +%s) - t0 )) s)"
timeout 200 python bench/fp8.py --model llama-8b --num-layers 8 --modes false,rowwise --micro-batches 4 \
  --budget 120 > $OUT/w8.txt 2>&1; grep -E "tok/s|FAILED|Error" $OUT/w8.txt
echo "($(( $(date +%s) - t0 )) s)"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true"
TORCH_LOGS=output_code timeout 120 python bench/profile_step.py $args --training.micro_batch_size=8 \
  --training.global_batch_size=8 --training.fp8=rowwise --steps 4 --full-names \
  > $OUT/rowwise_profile.txt 2> $OUT/rowwise_code.log
gzip -9 $OUT/rowwise_code.log; sed -n 3,7p $OUT/rowwise_profile.txt
echo "($(( $(date +%s) - t0 )) s)"
[ $(( $(date +%s) - t0 )) -lt 470 ] && timeout 110 python bench/profile_step.py $args --training.micro_batch_size=4 \
  --training.global_batch_size=4 --steps 6 --launches > $OUT/profile_bf16_4.txt 2>&1; head -n 30 $OUT/profile_bf16_4.txt
echo "total $(( $(date +%s) - t0 )) s"
