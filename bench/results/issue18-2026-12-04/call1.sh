export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__); import torch.nn.attention as a; print([n for n in dir(a) if 'flash' in n.lower() or 'impl' in n.lower()])"
timeout 120 python bench/wgrad_fusion.py 2>&1 | tail -12
M="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true"
for cfg in "4 false" "8 false" "8 tensorwise"; do set -- $cfg
  timeout 200 python bench/profile_step.py $M --training.micro_batch_size=$1 --training.global_batch_size=$1 --training.fp8=$2 > $OUT/prof_$1_$2.txt 2>&1
  echo "== mb $1 fp8 $2 rc $?"; grep -v "^|---" $OUT/prof_$1_$2.txt | grep -v Warning | head -32 | cut -c1-150
done
