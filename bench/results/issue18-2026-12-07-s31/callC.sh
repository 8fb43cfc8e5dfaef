# Call C (thirty-first session): does inductor's C++ wrapper (TORCHINDUCTOR_CPP_WRAPPER=1: the compiled
# graphs' launch code in C++ rather than Python) lift the host-bound small micro-batch step? profile_step,
# compiled rowwise llama-1b, seq 2048, micro-batch 1, eight a step (the weight cache on), without and with;
# then the same pair at micro-batch 8, one a step (not host-bound: should not change).
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s31c}; mkdir -p "$out"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.fp8=rowwise"
for run in "1 8 0" "1 8 1" "8 8 0" "8 8 1"; do
  set -- $run
  [ $(( $(date +%s) - t0 )) -lt ${BUDGET_S:-420} ] || break
  TORCHINDUCTOR_CPP_WRAPPER=$3 PYTHONPATH=$PWD timeout 200 python3 bench/profile_step.py $args \
    --training.micro_batch_size=$1 --training.global_batch_size=$2 --steps 3 > "$out/profile_mb$1_gb$2_cpp$3.txt" 2>&1
  echo "== mb $1 gb $2 cpp_wrapper $3 rc $? ($(( $(date +%s) - t0 )) s)"
  grep -E "^step time|^peak|^host time" "$out/profile_mb$1_gb$2_cpp$3.txt"
done
