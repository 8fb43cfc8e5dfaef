# Call 6 (written 2026-12-05, eleventh session; not run yet): the two compiler settings call 5 leaves out,
# bf16 and rowwise at micro-batch 8: pointwise autotuning (max_autotune_pointwise: more launch shapes timed
# for each fused kernel), and each GEMM chosen among cuBLAS and inductor's Triton templates by timing
# (max_autotune_gemm; its compiles take minutes). Predicted: pointwise about as much as call 5's
# coordinate descent; the GEMM choice 0-2% (cuBLAS's kernels usually win on Hopper; the layers' GEMMs run
# at 708 TFLOP/s, 72% of the bf16 peak, in the ninth session's profile).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for run in pointwise gemm; do
  case $run in
    pointwise) settings="max_autotune_pointwise=true" ;;
    gemm) settings="max_autotune_gemm=true,max_autotune_gemm_backends=ATEN+TRITON" ;;
  esac
  limit=150; [ "$run" = gemm ] && limit=400
  timeout $limit python bench/fp8.py --modes false,rowwise --micro-batches 8 --budget 300 \
    --inductor "$settings" > $OUT/inductor_$run.txt 2>&1
  echo "inductor: $run (rc=$?)"; grep -E "tok/s|FAILED|Error|inductor" $OUT/inductor_$run.txt | tail -n 3
done
# The caching allocator's expandable segments (PYTORCH_CUDA_ALLOC_CONF, never tried here; TorchTitan's
# launch scripts set it): bf16 at micro-batch 8 and 4, without and with, one process each. Predicted:
# the same speed within 0.5%, the same peak allocated, less memory reserved (fragmentation).
for alloc in default expandable; do
  conf=""; [ "$alloc" = expandable ] && conf="expandable_segments:True"
  PYTORCH_CUDA_ALLOC_CONF=$conf timeout 90 python bench/fp8.py --modes false --micro-batches 8,4 --budget 60 \
    > $OUT/alloc_$alloc.txt 2>&1
  echo "allocator: $alloc (rc=$?)"; grep -E "tok/s|FAILED|Error" $OUT/alloc_$alloc.txt | tail -n 3
done
