# Call 5 (written 2026-12-05, eleventh session; not run yet; after calls 1-4 if device time is left).
# Compiler settings the training step has never been tried with, through bench/fp8.py's --inductor, each
# on bf16 and rowwise at micro-batch 8 (one process a setting; inductor's caches make the later compiles
# short). Why: the fused element-wise kernels take 24 ms of the bf16 step and 51 ms of rowwise's (s7
# profile), most of rowwise's extra in reductions over rows of 8192 (SwiGLU's output and its gradients,
# their row and column amaxes), which inductor writes as looped reductions with fixed launch shapes; the
# layers' GEMMs run at 708 TFLOP/s (72% of the bf16 peak). Predicted: coordinate descent and the
# multi-kernel (a persistent and a looped version, the faster chosen at run time) 0.5-1 ms on bf16 and
# 2-5 ms on rowwise; pointwise autotuning about the same as coordinate descent; the GEMMs chosen among
# cuBLAS and inductor's Triton templates by timing: 0-2% (cuBLAS's kernels usually win on Hopper).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for run in default coordinate multikernel pointwise gemm; do
  case $run in
    default) settings="" ;;
    coordinate) settings="coordinate_descent_tuning=true" ;;
    multikernel) settings="triton.multi_kernel=1" ;;
    pointwise) settings="max_autotune_pointwise=true" ;;
    gemm) settings="max_autotune_gemm=true,max_autotune_gemm_backends=ATEN+TRITON" ;;
  esac
  limit=120; [ "$run" = gemm ] && limit=240
  timeout $limit python bench/fp8.py --modes false,rowwise --micro-batches 8 --budget 90 \
    --inductor "$settings" > $OUT/inductor_$run.txt 2>&1
  echo "inductor: $run (rc=$?)"; grep -E "tok/s|FAILED|Error" $OUT/inductor_$run.txt | tail -n 3
done
