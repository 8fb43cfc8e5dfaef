# Call 4: rowwise micro-batch 8 with the compiler's transposed casts (the default) against the Triton kernel
# (--fp8-kernel): call 3's rowwise trained at 1.05x bf16 where the sixth session's kernel run gave 1.12x.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
F="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true"
M8="$F --training.micro_batch_size=8 --training.global_batch_size=8 --training.fp8=rowwise"
for v in compiler kernel; do
  flag=""; [ $v = kernel ] && flag="--fp8-kernel"
  start=$(date +%s); timeout 105 python bench/profile_step.py $M8 --steps 6 $flag > $OUT/rowwise_$v.txt 2>&1
  echo "== $v rc $? $(( $(date +%s) - start )) s"; grep -E "^step time|^peak|^torch.compile" $OUT/rowwise_$v.txt | cut -c1-120
done
