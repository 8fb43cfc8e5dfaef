# Call A (thirtieth session), carry data/fp8-corpus. On an H200 first the issue's bf16 targets through
# `threefold train` (s29/h200_targets.sh). Then, on any card: the GPU test of the float8 weight cache
# (threefold/parallel/fp8_cache.py, new), and bench/profile_step.py compiled, rowwise, llama-1b, seq 2048,
# with gradient accumulation (micro-batch 2 x 8 and micro-batch 1 x 8 a step), the cache off then on.
# BUDGET_S: no new profile starts after that many seconds.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s30a}; mkdir -p "$out"
card=$(nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt")
echo "card: $card"
case "$card" in *H200*) OUT=$out bash bench/results/issue18-2026-12-06-s29/h200_targets.sh ;; esac
PYTHONPATH=$PWD timeout 240 python3 -m pytest -q -m gpu tests/test_gpu_fp8.py -k cast_once --tb=short \
  -p no:logging -p no:cacheprovider > "$out/gpu-tests.txt" 2>&1
echo "== gpu test rc $? ($(( $(date +%s) - t0 )) s)"; tail -4 "$out/gpu-tests.txt"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.fp8=rowwise"
for run in 2:off 2:on 1:off 1:on; do
  [ $(( $(date +%s) - t0 )) -lt ${BUDGET_S:-470} ] || break
  mb=${run%:*}; cache=${run#*:}; flag=false; [ $cache = on ] && flag=true
  PYTHONPATH=$PWD timeout 110 python3 bench/profile_step.py $args --training.micro_batch_size=$mb \
    --training.global_batch_size=$(( 8 * mb )) --training.fp8_weight_cache=$flag --steps 3 \
    > "$out/profile_mb${mb}_cache_$cache.txt" 2>&1
  echo "== micro-batch $mb x 8, cache $cache rc $? ($(( $(date +%s) - t0 )) s)"
  grep -E "^step time|^peak" "$out/profile_mb${mb}_cache_$cache.txt"
done
echo "total $(( $(date +%s) - t0 )) s"
