# Call C (thirtieth session), no carry, on call B's machine while it was still warm: the micro-batch 1 x 8
# pair of bench/profile_step.py (compiled rowwise llama-1b, seq 2048), the float8 weight cache off then on.
# Run as one command line through the device tool; written out here as it ran.
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.fp8=rowwise --training.micro_batch_size=1 --training.global_batch_size=8"
for c in false true; do
  PYTHONPATH=$PWD timeout 100 python3 bench/profile_step.py $args --training.fp8_weight_cache=$c --steps 3 \
    > $OUT/profile_mb1_cache_$c.txt 2>&1
  echo "== cache $c rc $?"; grep -E "^step time|^host time|^peak" $OUT/profile_mb1_cache_$c.txt
done
