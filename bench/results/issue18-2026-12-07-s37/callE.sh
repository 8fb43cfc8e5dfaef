# Call E (planned in the thirty-seventh session for the next GPU; never run: the thirty-eighth session found
# QuACK's failure came from the unpack folder, not the CuTe DSL's release, and ran its calls B and C
# instead): everything left open at micro-batch 8 in one call on an H200. Needs `training.mlp_backend` back
# in the tree (`git revert 3fa54ad &&
# git cherry-pick 7d3c8d7 ad4da5d`: the branch quack-mlp's two later commits) and FA4's packages packed with
# the CuTe DSL 4.7.1 (`CUTLASS=4.7.1 bash bench/fa4_pack.sh` in a scratch folder, its parts copied to .q47a
# and .q47b). A first call carries .q47a
# (`mkdir -p /tmp/fa4parts && cp .q47a/part /tmp/fa4parts/a`); this one, on the same warm machine, carries
# .q47b, .tt and data/fp8-small (about 58 MB with the tracked tree). In order:
#   1. the GPU tests of the QuACK MLP (tests/test_gpu.py -k quack): whether QuACK 0.6.5's epilogue GEMMs
#      build and compute the MLP under 4.7.1;
#   2. one round of bench/torchtitan_side_by_side.sh at batch 8, threefold with torch's attention and with
#      FA4 (TorchTitan and FA4 in one call on an H200, missing so far);
#   3. `threefold train` at micro-batch 8 with FA4 and the QuACK MLP, then torch's attention and the QuACK
#      MLP (only if step 1 passed);
#   4. bench/quack_mlp.py at micro-batch 8's tokens;
# the card's power and SM clock sampled once a second; everything packed into $OUT/callE.tgz.
# Run as `PYTHONPATH=$PWD bash <this> 2>&1 | tee $OUT/output.txt` from the device's repository root.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
. bench/fa4_unpack.sh .q47b/part /tmp/q47site || exit
out=/tmp/s37e; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, quack, cutlass; print('torch', torch.__version__, 'quack', quack.__version__, 'cutlass', cutlass.__version__)" | tee -a "$out/gpu.txt"
echo "unpacked ($(( $(date +%s) - t0 )) s)"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
echo "== 1. GPU tests ($(( $(date +%s) - t0 )) s)"
timeout 100 python3 -m pytest -q -o addopts="" --tb=short -p no:logging -p no:cacheprovider -m gpu \
  tests/test_gpu.py -k quack > "$out/tests.txt" 2>&1
passed=$?
grep -vi warn "$out/tests.txt" | tail -15
echo "== 2. side by side ($(( $(date +%s) - t0 )) s)"
TF_ARGS=--data.path=data/fp8-small BACKENDS="auto fa4" ROUND_S=1 OUT=$out/side bash bench/torchtitan_side_by_side.sh 8
if [ "$passed" = 0 ]; then
  echo "== 3. the QuACK MLP ($(( $(date +%s) - t0 )) s)"
  for a in fa4 auto; do
    dir=/tmp/train8-quack-$a-$(date +%s)
    timeout 150 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
      --training.micro_batch_size=8 --training.global_batch_size=8 --data.path=data/fp8-small \
      --training.mlp_backend=quack --training.attention_backend=$a --logging.out_dir="$dir" > "$dir.log" 2>&1
    echo "mlp quack attention $a rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$dir.log")"
    grep -iE "error|Traceback" "$dir.log" | head -5
    cp "$dir.log" "$out/"; cp "$dir/metrics.jsonl" "$out/$(basename "$dir").jsonl" 2>/dev/null
  done
  echo "== 4. bench/quack_mlp.py ($(( $(date +%s) - t0 )) s)"
  timeout 60 python3 bench/quack_mlp.py --tokens 16384
fi
kill $smi
[ -n "${OUT:-}" ] && tar -C "$out" -czf "$OUT/callE.tgz" .
echo "total $(( $(date +%s) - t0 )) s"
