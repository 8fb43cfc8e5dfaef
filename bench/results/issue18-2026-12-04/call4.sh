export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
M="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true"
timeout 300 python bench/profile_step.py $M --training.micro_batch_size=4 --training.global_batch_size=4 --host > $OUT/host_mb4.txt 2>&1
echo "== host rc $?"; grep -E "^step time|^host time" $OUT/host_mb4.txt
sed -n '/host functions by own time/,$p' $OUT/host_mb4.txt | grep -v "^|---" | cut -c1-170 | head -80
for v in new old; do
  X=0; [ $v = old ] && X=1
  TF_LOSS_OLD=$X timeout 200 python bench/profile_step.py $M --training.micro_batch_size=8 --training.global_batch_size=8 > $OUT/mb8_$v.txt 2>&1
  echo "== mb8 loss $v rc $?"; grep -E "^step time|CUDAFunctor_add|^\| (gemm|other)" $OUT/mb8_$v.txt | cut -c1-150
done
