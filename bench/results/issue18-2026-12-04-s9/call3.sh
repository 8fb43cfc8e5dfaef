# Call 3: separate projections against one GEMM on concatenated weights; the loss's element-wise kernels.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 200 python bench/step_kernels.py > $OUT/step_kernels.txt 2>&1; grep -v Warn $OUT/step_kernels.txt
