export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 150 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "main_grad or fused_adamw" 2>&1 | tail -3
M="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true"
for cfg in "4 false k" "4 false t" "8 false k"; do set -- $cfg
  X=""; [ $3 = t ] && X=--torch-grad-move
  timeout 200 python bench/profile_step.py $M --training.micro_batch_size=$1 --training.global_batch_size=$1 --training.fp8=$2 $X > $OUT/prof_$1_$2_$3.txt 2>&1
  echo "== mb $1 fp8 $2 $3 rc $?"; grep -v "^|---" $OUT/prof_$1_$2_$3.txt | grep -v "Warning\|warn_once" | head -24 | cut -c1-140
done
