# Call E (twenty-third session): where the float8 output layer's time goes. bench/profile_step.py at
# micro-batch 8, llama-1b, seq 2048, compiled, rowwise, with and without training.fp8_output_layer, same
# machine; the kernel tables land in $OUT.
out=${OUT:-/tmp/s23e}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.micro_batch_size=8 --training.global_batch_size=8 --training.fp8=rowwise"
# Run as `PYTHONPATH=$PWD bash callE.sh` (the first try, without it, stopped at the import).
for output in true false; do
  timeout 140 python bench/profile_step.py $args --training.fp8_output_layer=$output --steps 4 \
    > "$out/profile_rowwise_output_$output.txt" 2>&1
  echo "== output layer in float8: $output rc $?"; grep -E "^step time|^peak" "$out/profile_rowwise_output_$output.txt"
done
