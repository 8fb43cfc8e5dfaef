# Call B (thirty-second session), carry data/fp8-corpus: the thirty-first session's probe of CUDA graphs over
# the compiled layers (bench/results/issue18-2026-12-07-s31/callE.sh without its H200 targets, which call A
# measures): TORCHINDUCTOR_CUDAGRAPHS=0 and 1 at micro-batch 1, eight a step, rowwise and bf16, the warm-up
# losses side by side. BUDGET_S: no new run starts after that many seconds.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s32b}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.micro_batch_size=1 --training.global_batch_size=8"
for run in "rowwise 0" "rowwise 1" "bf16 0" "bf16 1"; do
  set -- $run
  [ $(( $(date +%s) - t0 )) -lt ${BUDGET_S:-420} ] || break
  extra=""; [ $1 = rowwise ] && extra="--training.fp8=rowwise"
  TORCHINDUCTOR_CUDAGRAPHS=$2 PYTHONPATH=$PWD timeout 200 python3 bench/profile_step.py $args $extra --steps 3 \
    > "$out/profile_$1_cudagraphs$2.txt" 2>&1
  echo "== $1 cudagraphs $2 rc $? ($(( $(date +%s) - t0 )) s)"
  grep -E "^losses|^step time|^peak|^host time|^torch.compile" "$out/profile_$1_cudagraphs$2.txt"
  grep -iE "skipping cudagraph|Error" "$out/profile_$1_cudagraphs$2.txt" | sort | uniq -c | head -5
done
echo "total $(( $(date +%s) - t0 )) s"
