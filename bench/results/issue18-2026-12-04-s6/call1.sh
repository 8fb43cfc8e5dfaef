# Call 1: GPU tests; fp8 tensorwise micro-batch 8, 42fa756 (old_tree/) against 7eb12ef; bf16 micro-batch 4
# with the stock RoPE and with bshd_rope.py, the compiled code's attention strides from TORCH_LOGS.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=bench/results/issue18-2026-12-04-s6
python -c "import torch,triton;print(torch.__version__, triton.__version__, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(0))"
timeout 240 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_fp8.py tests/test_gpu.py -k "not graphed" > $OUT/gpu_tests.txt 2>&1; echo "tests rc $?"; tail -2 $OUT/gpu_tests.txt
F="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true"
M8="$F --training.micro_batch_size=8 --training.global_batch_size=8 --training.fp8=tensorwise"
(cd old_tree && PYTHONPATH=$PWD timeout 150 python bench/profile_step.py $M8 --steps 6 > $OUT/old_fp8_8.txt 2>&1); echo "== old fp8 mb8 rc $?"; grep -E "^step time|^peak|^host" $OUT/old_fp8_8.txt
timeout 150 python bench/profile_step.py $M8 --steps 6 > $OUT/new_fp8_8.txt 2>&1; echo "== new fp8 mb8 rc $?"; grep -E "^step time|^peak|^host" $OUT/new_fp8_8.txt
grep -E "^\| (gemm|triton|other|attention|optimizer) " $OUT/new_fp8_8.txt
M4="$F --training.micro_batch_size=4 --training.global_batch_size=4 --training.fp8=false"
TORCH_LOGS=output_code timeout 150 python bench/profile_step.py $M4 --steps 6 > $OUT/base_4.txt 2> $OUT/base_4.err; echo "== bf16 mb4 stock rope rc $?"
TORCH_LOGS=output_code timeout 150 python $R/bshd_rope.py $M4 --steps 6 > $OUT/bshd_4.txt 2> $OUT/bshd_4.err; echo "== bf16 mb4 bshd rope rc $?"
for v in base_4 bshd_4; do
  echo "-- $v"; grep -E "^step time|^peak" $OUT/$v.txt; grep -E "elementwise_kernel<128, 4" $OUT/$v.txt | head -2 | cut -c1-130
  grep -c "cudnn_attention" $OUT/$v.err; grep -o "(4, 32, 2048, 64), ([0-9, ]*)" $OUT/$v.err | sort | uniq -c | head -6
  grep -m2 "_cudnn_attention.*default(" $OUT/$v.err | cut -c1-200
done
gzip -f $OUT/*.err
