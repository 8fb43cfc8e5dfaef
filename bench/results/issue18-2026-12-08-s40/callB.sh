# Call B (fortieth session; written, not run: no machine came): after call A
# (bench/results/issue18-2026-12-05-s18/callA.sh, carrying .fa4a) on the same warm machine; this call carries
# .fa4b, .tt and data/fp8-small. All in one call, since machines come rarely: the GPU tests of the loss
# kernels (both paths); `bench/step_kernels.py --parts loss` (one rank's fused loss kernel, `one_rank_kernel`,
# at several settings against the two kernels); TorchTitan v0.2.2 beside threefold with FA4 and the QuACK MLP
# (bench/torchtitan_side_by_side.sh 8, one round); then `threefold train` with the fused kernel at the
# fastest setting found (this machine's copy of threefold/model/loss.py rewritten with ONE_RANK_KERNEL on)
# and with the two kernels (main's default), alternating while under 470 s. Micro-batch 8, llama-1b, seq
# 2048; power and SM clock once a second. Everything lands under $OUT as it goes. Run as
# `bash <this> 2>&1 | tee $OUT/output.txt` from the repository root.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
. bench/fa4_unpack.sh .fa4b/part /tmp/fa4env || exit
out=${OUT:-/tmp/s40b}; mkdir -p "$out"
src=threefold/model/loss.py
cp "$src" /tmp/loss.two.py
python3 - "$src" /tmp/loss.fused.py <<'PY'
import sys
text = open(sys.argv[1]).read()
old = "ONE_RANK_KERNEL = False"
assert text.count(old) == 1
open(sys.argv[2], "w").write(text.replace(old, "ONE_RANK_KERNEL = True"))
PY
[ -s /tmp/loss.fused.py ] || exit 5
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader | tee "$out/gpu.txt"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
timeout 150 python3 -m pytest -o addopts="" --tb=short -p no:logging -p no:cacheprovider -m gpu -q \
  tests/test_gpu.py tests/test_gpu_fp8.py -k "compiled_loss or output_layer" 2>&1 | tail -15
echo "tests done ($(( $(date +%s) - t0 )) s)"
timeout 150 python3 bench/step_kernels.py --parts loss --rounds 3 > "$out/step_kernels.txt" 2>&1
tail -45 "$out/step_kernels.txt"
echo "bench done ($(( $(date +%s) - t0 )) s)"
# the fused kernel takes the fastest setting found above (FUSED="per_sm warps block" overrides)
set -- ${FUSED:-$(grep "^fastest fused setting" "$out/step_kernels.txt" | awk '{print $(NF-2), $(NF-1), $NF}')}
if [ $# -eq 3 ]; then
  sed -i -e "s/^ONE_RANK_PROGRAMS_PER_SM = .*/ONE_RANK_PROGRAMS_PER_SM = $1/" \
    -e "s/^ONE_RANK_WARPS = .*/ONE_RANK_WARPS = $2/" -e "s/^ONE_RANK_BLOCK = .*/ONE_RANK_BLOCK = $3/" \
    /tmp/loss.fused.py
fi
grep -E "^(ONE_RANK_PROGRAMS_PER_SM|ONE_RANK_WARPS|ONE_RANK_BLOCK) = " /tmp/loss.fused.py
TF_ARGS="--data.path=data/fp8-small" BACKENDS="fa4:quack" ROUND_S=1 OUT=$out/side \
  bash bench/torchtitan_side_by_side.sh 8
for run in ${RUNS:-fused two fused two fused}; do
  [ $(( $(date +%s) - t0 )) -lt 470 ] || break
  cp "/tmp/loss.$run.py" "$src"
  dir=/tmp/train8-$run-$(date +%s)
  timeout 120 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.micro_batch_size=8 --training.global_batch_size=8 --data.path=data/fp8-small \
    --training.mlp_backend=quack --training.attention_backend=fa4 --logging.out_dir="$dir" > "$dir.log" 2>&1
  echo "$run rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$dir.log")"
  grep -iE "error|Traceback" "$dir.log" | head -5
  cp "$dir.log" "$out/"; cp "$dir/metrics.jsonl" "$out/$(basename "$dir").jsonl" 2>/dev/null
  cp /tmp/loss.two.py "$src"
done
kill $smi
echo "total $(( $(date +%s) - t0 )) s"
