# Call D (thirteenth session): is triton.multi_kernel=1 worth turning on? Call B saw rowwise micro-batch 8 at
# 78,966 against 77,510 tokens/s by default (one run each). Here: default and multi-kernel interleaved twice,
# bf16 and rowwise at micro-batch 8, each run its own process (fresh compile).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
for run in default multikernel default multikernel; do
  settings=""; [ "$run" = multikernel ] && settings="triton.multi_kernel=1"
  echo "== inductor: $run" >> $OUT/multikernel.txt
  timeout 110 python bench/fp8.py --modes false,rowwise --micro-batches 8 --budget 60 \
    --inductor "$settings" >> $OUT/multikernel.txt 2>&1
  echo "inductor: $run (rc=$?, $(( $(date +%s) - t0 )) s)"; grep -E "tok/s|FAILED|Error" $OUT/multikernel.txt | tail -n 2
done
echo "total $(( $(date +%s) - t0 )) s"
