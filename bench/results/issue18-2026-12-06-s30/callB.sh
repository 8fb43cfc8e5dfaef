# Call B (thirtieth session), no carry. The float8 weight cache now casts with compiled code when the model
# is compiled (call A's eager casts: the GPU time fell, the host time rose more). bench/profile_step.py,
# compiled rowwise llama-1b, seq 2048, micro-batch 2 x 8 a step, cache off then on; the GPU test of the
# cache; then the cache on at micro-batch 1 x 8 with --host (call A found that step host-bound: where the
# host's time goes). BUDGET_S as callA.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s30b}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.fp8=rowwise --training.micro_batch_size=2 --training.global_batch_size=16"
for cache in off on; do
  flag=false; [ $cache = on ] && flag=true
  PYTHONPATH=$PWD timeout 110 python3 bench/profile_step.py $args --training.fp8_weight_cache=$flag --steps 3 \
    > "$out/profile_mb2_cache_$cache.txt" 2>&1
  echo "== micro-batch 2 x 8, cache $cache rc $? ($(( $(date +%s) - t0 )) s)"
  grep -E "^step time|^host time|^peak" "$out/profile_mb2_cache_$cache.txt"
done
PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -m gpu tests/test_gpu_fp8.py -k cast_once --tb=short \
  -p no:logging -p no:cacheprovider > "$out/gpu-tests.txt" 2>&1
echo "== gpu test rc $? ($(( $(date +%s) - t0 )) s)"; tail -4 "$out/gpu-tests.txt"
if [ $(( $(date +%s) - t0 )) -lt ${BUDGET_S:-420} ]; then
  PYTHONPATH=$PWD timeout 120 python3 bench/profile_step.py $args --training.fp8_weight_cache=true --steps 3 \
    --training.micro_batch_size=1 --training.global_batch_size=8 --host > "$out/profile_mb1_cache_on_host.txt" 2>&1
  echo "== host profile rc $? ($(( $(date +%s) - t0 )) s)"
fi
echo "total $(( $(date +%s) - t0 )) s"
