export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 150 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "never_waits or compiled_loss or main_grad or fused_adamw" 2>&1 | tail -2
M="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true"
for mb in 4 8; do
  (cd old_tree && PYTHONPATH=$PWD timeout 200 python bench/profile_step.py $M --training.micro_batch_size=$mb --training.global_batch_size=$mb > $OUT/old_$mb.txt 2>&1); echo "== old mb$mb rc $?"; grep -E "^step time" $OUT/old_$mb.txt | cut -c1-140
  timeout 200 python bench/profile_step.py $M --training.micro_batch_size=$mb --training.global_batch_size=$mb > $OUT/new_$mb.txt 2>&1; echo "== new mb$mb rc $?"; grep -E "^step time|^host time" $OUT/new_$mb.txt | cut -c1-140
done
timeout 300 python bench/fp8.py --budget 230 2>&1 | grep -v "Warn\|warn_once" | tail -16
