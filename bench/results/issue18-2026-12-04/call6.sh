export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 200 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_fp8.py tests/test_gpu.py -k "not graphed" 2>&1 | tail -4
M="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true --training.micro_batch_size=8 --training.global_batch_size=8 --training.fp8=tensorwise"
(cd old_tree && PYTHONPATH=$PWD timeout 200 python bench/profile_step.py $M > $OUT/old_fp8.txt 2>&1); echo "== old fp8 mb8 rc $?"; grep -E "^step time|^\| (gemm|triton|other)" $OUT/old_fp8.txt | cut -c1-140
timeout 200 python bench/profile_step.py $M > $OUT/new_fp8.txt 2>&1; echo "== new fp8 mb8 rc $?"; grep -E "^step time|^\| (gemm|triton|other)|transposed|fp8" $OUT/new_fp8.txt | cut -c1-140
grep -v "^|---" $OUT/new_fp8.txt | grep "triton_" | head -12 | cut -c1-140
timeout 260 python bench/fp8.py --budget 150 2>&1 | grep -v "Warn\|warn_once" | tail -14
