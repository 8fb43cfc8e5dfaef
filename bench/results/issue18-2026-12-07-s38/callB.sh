# Call B (thirty-eighth session): the QuACK MLP on a GPU, its packages unpacked under a folder named
# site-packages (bench/fa4_unpack.sh; session 37's failure came from unpacking them elsewhere). Call A
# (bench/results/issue18-2026-12-05-s18/callA.sh, carrying .fa4a) ran first on the same warm machine; this
# call carries .fa4b (the CuTe DSL 4.8.1 and QuACK 0.6.5, what `pip install -e ".[fa4]"` brings today) and
# data/fp8-small. In order: the QuACK MLP's GPU tests; `threefold train` at micro-batch 8 with FA4 and the
# QuACK MLP (only if the tests passed); bench/quack_mlp.py at micro-batch 8's tokens; the card's power and SM
# clock sampled once a second; everything packed into $OUT/callB.tgz.
# Run as `PYTHONPATH=$PWD bash <this> 2>&1 | tee $OUT/output.txt` from the device's repository root.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
. bench/fa4_unpack.sh .fa4b/part /tmp/fa4env || exit
out=/tmp/s38b; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, quack, cutlass; print(torch.__version__, quack.__version__, cutlass.__version__, quack.__file__)" \
  | tee -a "$out/gpu.txt"
echo "unpacked ($(( $(date +%s) - t0 )) s)"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
echo "== 1. GPU tests ($(( $(date +%s) - t0 )) s)"
timeout 200 python3 -m pytest -q -o addopts="" --tb=short -p no:logging -p no:cacheprovider -m gpu \
  tests/test_gpu.py -k quack > "$out/tests.txt" 2>&1
passed=$?
grep -vi warn "$out/tests.txt" | tail -25
if [ "$passed" = 0 ]; then
  echo "== 2. threefold train, FA4 + the QuACK MLP ($(( $(date +%s) - t0 )) s)"
  dir=/tmp/train8-quack-fa4-$(date +%s)
  timeout 200 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.micro_batch_size=8 --training.global_batch_size=8 --data.path=data/fp8-small \
    --training.mlp_backend=quack --training.attention_backend=fa4 --logging.out_dir="$dir" > "$dir.log" 2>&1
  echo "mlp quack attention fa4 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$dir.log")"
  grep -iE "error|Traceback" "$dir.log" | head -5
  cp "$dir.log" "$out/"; cp "$dir/metrics.jsonl" "$out/$(basename "$dir").jsonl" 2>/dev/null
fi
echo "== 3. bench/quack_mlp.py ($(( $(date +%s) - t0 )) s)"
timeout 120 python3 bench/quack_mlp.py --tokens 16384 2>&1 | grep -vi warn | tail -20
kill $smi
[ -n "${OUT:-}" ] && tar -C "$out" -czf "$OUT/callB.tgz" .
echo "total $(( $(date +%s) - t0 )) s"
