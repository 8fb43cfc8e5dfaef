# Call E (twenty-fourth session): the layers' rowwise GEMMs on cuBLAS's row-scaled kernel against its
# one-scale kernel with the scales multiplied in after (threefold.parallel.fp8.ROW_SCALES_AFTER), same
# machine: bench/profile_step.py, llama-1b, seq 2048, micro-batch 8, compiled, rowwise + output layer.
# Run as `PYTHONPATH=$PWD bash callE.sh` at commit d6fb2bf (the switch and the flag were removed after
# this measurement: 'after' ran 8.9% slower); the kernel tables land in $OUT.
out=${OUT:-/tmp/s24e}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.micro_batch_size=8 --training.global_batch_size=8 --training.fp8=rowwise \
 --training.fp8_output_layer=true"
for scales in after kernel; do
  timeout 110 python bench/profile_step.py $args --fp8-row-scales=$scales --steps 4 > "$out/profile_$scales.txt" 2>&1
  echo "== row scales: $scales rc $?"; grep -E "^step time|^peak" "$out/profile_$scales.txt"
done
