# Call B (twelfth session): what could still move bf16 at micro-batch 8 and 4, each an A/B in separate processes
# (the tenth session's call5 part 2, call3 part 2 and call6 part 2): compiler settings never tried on the
# step (coordinate descent, multi-kernel, mixed-order reductions off) on bf16 and rowwise at micro-batch 8;
# the AdamW update in one launch at micro-batch 4; the allocator's expandable segments at 8 and 4.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
for run in default coordinate multikernel mixorder; do
  case $run in
    default) settings="" ;;
    coordinate) settings="coordinate_descent_tuning=true" ;;
    multikernel) settings="triton.multi_kernel=1" ;;
    mixorder) settings="triton.mix_order_reduction=false" ;;
  esac
  echo "== inductor: $run" >> $OUT/inductor.txt
  timeout 110 python bench/fp8.py --modes false,rowwise --micro-batches 8 --budget 60 \
    --inductor "$settings" >> $OUT/inductor.txt 2>&1
  echo "inductor: $run (rc=$?, $(( $(date +%s) - t0 )) s)"; grep -E "tok/s|FAILED|Error|inductor" $OUT/inductor.txt | tail -n 2
done
for run in each one; do
  flag=""; [ "$run" = one ] && flag="--one-launch-adamw"
  echo "== AdamW launches: $run" >> $OUT/adamw.txt
  timeout 80 python bench/fp8.py --modes false --micro-batches 4 --budget 40 $flag >> $OUT/adamw.txt 2>&1
  echo "AdamW launches: $run ($(( $(date +%s) - t0 )) s)"; grep -E "tok/s|FAILED|Error" $OUT/adamw.txt | tail -n 1
done
for alloc in default expandable; do
  [ $(( $(date +%s) - t0 )) -gt 500 ] && break
  conf=""; [ "$alloc" = expandable ] && conf="expandable_segments:True"
  echo "== allocator: $alloc" >> $OUT/alloc.txt
  PYTORCH_CUDA_ALLOC_CONF=$conf timeout 80 python bench/fp8.py --modes false --micro-batches 8,4 --budget 40 \
    >> $OUT/alloc.txt 2>&1
  echo "allocator: $alloc ($(( $(date +%s) - t0 )) s)"; grep -E "tok/s|FAILED|Error" $OUT/alloc.txt | tail -n 2
done
echo "total $(( $(date +%s) - t0 )) s"
