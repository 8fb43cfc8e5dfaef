# Call 2: is bf16 training on the GPU deterministic run to run (the same tree twice)? do the norms of
# bf16 gradients and of their fp32 copies agree bit for bit? then where bf16 micro-batch 8's step goes now.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python bench/results/issue18-2026-12-04-s9/norm_check.py 2>&1 | tail -4
for i in 1 2; do timeout 130 python bench/fp8.py --modes false --budget 100 > $OUT/repeat$i.txt 2>&1; grep -E "tok/s|FAILED" $OUT/repeat$i.txt; done
timeout 200 python bench/profile_step.py --model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true --training.micro_batch_size=8 --training.global_batch_size=8 --steps 6 > $OUT/profile_bf16_8.txt 2>&1; grep -v Warn $OUT/profile_bf16_8.txt | head -60
