# Call 3 (not run yet). Why the loss's Triton kernels gave micro-batch 4 nothing (ninth session): its
# profile, bf16, compiled, direct gradients. The guess: at micro-batch 4 the host sets the pace (earlier
# profiles of micro-batch 4 had the GPU idle 4-6% of a step and the host 130-137 ms to queue one), so
# GPU time saved does not show. Then bf16 micro-batch 4 with the optimizer's update in one kernel launch
# instead of 147 (threefold.adamw.ONE_LAUNCH, --one-launch-adamw), against the launch per tensor.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
  --training.compile=true --training.micro_batch_size=4 --training.global_batch_size=4 --steps 6"
timeout 200 python bench/profile_step.py $args --launches > $OUT/profile_bf16_4.txt 2>&1; head -n 30 $OUT/profile_bf16_4.txt
for run in each one; do
  flag=""; [ "$run" = one ] && flag="--one-launch-adamw"
  timeout 100 python bench/fp8.py --modes false --micro-batches 4 --budget 60 $flag > $OUT/adamw_$run.txt 2>&1
  echo "AdamW launches: $run"; grep -E "tok/s|FAILED|Error" $OUT/adamw_$run.txt
done
# The float8 transposed cast's launch shape (eleventh session): 16 tile sizes and warp counts on the 12
# shapes a rowwise llama-1b step casts at micro-batch 8 (400 casts), each checked bit for bit against
# today's 64x64 / 4 warps. Predicted: today's runs near 2.9 TB/s (12.34 ms for 448 casts, s7 profile); a
# larger tile 3.5-4 TB/s, 1-3 ms a step less.
timeout 150 python bench/transposed_cast_tiles.py > $OUT/cast_tiles.txt 2>&1; tail -n 20 $OUT/cast_tiles.txt
