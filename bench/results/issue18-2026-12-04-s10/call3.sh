# Call 3 (not run yet). Why the loss's Triton kernels gave micro-batch 4 nothing (ninth session): its
# profile, bf16, compiled, direct gradients; then the same with the projections stacked.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
  --training.compile=true --training.micro_batch_size=4 --training.global_batch_size=4 --steps 6"
timeout 200 python bench/profile_step.py $args > $OUT/profile_bf16_4.txt 2>&1; head -n 30 $OUT/profile_bf16_4.txt
