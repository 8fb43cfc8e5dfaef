# Call E (fourteenth session): the one compiler setting never run on the GPU, each GEMM chosen among cuBLAS
# and inductor's Triton templates by timing (max_autotune_gemm; the tenth session's call6 wrote it, no
# session ran it). bf16 micro-batch 8, the default before and after, each run its own process. Predicted:
# 0-2% (cuBLAS's kernels usually win on Hopper; the layers' GEMMs ran at 708 TFLOP/s in the ninth session's
# profile, against 681-759 for square GEMMs on an H200).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
# Power and clocks once a second through every run: is the step at the card's power limit (the GEMMs'
# rate falls from 759 to 681 TFLOP/s from 4096^3 to 16384^3 on an H200)?
nvidia-smi dmon -s pct -d 1 -o T > $OUT/dmon.txt 2>&1 &
dmon=$!
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm,clocks_event_reasons.active --format=csv -lms 500 \
  > $OUT/power.csv 2>&1 &
query=$!
for run in default autotune default; do
  settings=""; limit=100
  [ "$run" = autotune ] && settings="max_autotune_gemm=true,max_autotune_gemm_backends=ATEN+TRITON" && limit=330
  echo "== inductor: $run" >> $OUT/autotune.txt
  timeout $limit python bench/fp8.py --modes false --micro-batches 8 --budget 30 \
    --inductor "$settings" >> $OUT/autotune.txt 2>&1
  echo "inductor: $run (rc=$?, $(( $(date +%s) - t0 )) s)"; grep -E "tok/s|FAILED|Error" $OUT/autotune.txt | tail -n 1
done
kill $dmon $query
echo "total $(( $(date +%s) - t0 )) s"
