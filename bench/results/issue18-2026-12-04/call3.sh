export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 120 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "compiled_loss or main_grad" 2>&1 | tail -2
M="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true"
run() { name=$1; shift; timeout 200 python bench/profile_step.py $M "$@" > $OUT/prof_$name.txt 2>&1; echo "== $name rc $?"
  grep -E "^step time|^host time|^\| (gemm|attention|optimizer|triton|other)|elementwise_kernel<128|Memset|fmha|dot_do_o|flash|CUDAFunctor_add" $OUT/prof_$name.txt | cut -c1-150 | head -24; }
run mb4 --training.micro_batch_size=4 --training.global_batch_size=4
TF_ROPE_BHSD=1 run mb4_bhsd --training.micro_batch_size=4 --training.global_batch_size=4
run mb4_flash --training.micro_batch_size=4 --training.global_batch_size=4 --training.attention_backend=flash
run mb8 --training.micro_batch_size=8 --training.global_batch_size=8
