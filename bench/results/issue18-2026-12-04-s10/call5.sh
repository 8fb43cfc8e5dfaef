# Call 5 (written 2026-12-05, eleventh session; not run yet; after calls 1-4 if device time is left).
# 1. What the compiler made of rowwise's casts: a profile of rowwise micro-batch 8 with whole kernel names
#    and the generated code (TORCH_LOGS=output_code, gzipped). The seventh session's profile had SwiGLU's
#    forward and its cast in one reduction taking 11.9 ms a step (0.74 ms a layer, where reading gate
#    and up and writing the float8 product is about 0.7 GB, 0.15 ms at 4.8 TB/s); its code says why.
# 2. Compiler settings the training step has never been tried with, through bench/fp8.py's --inductor,
#    each on bf16 and rowwise at micro-batch 8 (one process a setting; inductor's caches make the later
#    compiles short): coordinate-descent tuning of the fused kernels' launch shapes; the multi-kernel (a
#    persistent and a looped version of each reduction, the faster chosen at run time); the mixed-order
#    reductions (row and column reductions of one input in one kernel) turned off. Why: the fused
#    element-wise kernels take 24 ms of the bf16 step and 51 ms of rowwise's (s7 profile), rowwise's
#    extra mostly reductions over rows of 8192 and column amaxes. Predicted: 0.5-1 ms on bf16 and 2-5 ms on
#    rowwise from coordinate descent or the multi-kernel; the mixed-order switch either way (it exists
#    in torch 2.13; if 2.11 lacks it, that run stops at once naming the setting).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
  --training.compile=true --training.micro_batch_size=8 --training.global_batch_size=8 --training.fp8=rowwise"
TORCH_LOGS=output_code timeout 140 python bench/profile_step.py $args --steps 4 --full-names \
  > $OUT/rowwise_profile.txt 2> $OUT/rowwise_code.log
gzip -9 $OUT/rowwise_code.log; sed -n 3,7p $OUT/rowwise_profile.txt
for run in default coordinate multikernel mixorder; do
  case $run in
    default) settings="" ;;
    coordinate) settings="coordinate_descent_tuning=true" ;;
    multikernel) settings="triton.multi_kernel=1" ;;
    mixorder) settings="triton.mix_order_reduction=false" ;;
  esac
  timeout 100 python bench/fp8.py --modes false,rowwise --micro-batches 8 --budget 60 \
    --inductor "$settings" > $OUT/inductor_$run.txt 2>&1
  echo "inductor: $run (rc=$?)"; grep -E "tok/s|FAILED|Error|inductor" $OUT/inductor_$run.txt | tail -n 3
done
