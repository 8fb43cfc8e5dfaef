# Call 5 (written 2026-12-05, eleventh session; not run yet; after calls 1-4 if device time is left).
# Compiler settings the bf16 step has never been tried with, through bench/fp8.py's --inductor: bf16
# micro-batch 8, the default against inductor choosing each GEMM among cuBLAS and its Triton templates
# by timing them (max_autotune_gemm; compiles take minutes), then with coordinate-descent tuning of the
# fused element-wise kernels' launch shapes. Why: the layers' GEMMs run at 708 TFLOP/s (72% of the bf16
# peak, ninth-session profile) and the fused element-wise kernels take 24 ms a step. Predicted: small;
# cuBLAS's kernels usually win on Hopper (0-2% from the GEMMs), 0.5-1 ms from coordinate descent.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for run in default autotune coordinate; do
  case $run in
    default) settings="" ;;
    autotune) settings="max_autotune_gemm=true,max_autotune_gemm_backends=ATEN+TRITON" ;;
    coordinate) settings="coordinate_descent_tuning=true" ;;
  esac
  limit=110; [ "$run" = autotune ] && limit=300
  timeout $limit python bench/fp8.py --modes false --micro-batches 8 --budget 60 \
    --inductor "$settings" > $OUT/inductor_$run.txt 2>&1
  echo "inductor: $run (rc=$?)"; grep -E "tok/s|FAILED|Error" $OUT/inductor_$run.txt | tail -n 3
done
