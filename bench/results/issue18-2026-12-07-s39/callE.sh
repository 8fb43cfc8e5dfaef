# Call E (thirty-ninth session; ran on an H100 with the tree at c045509, whose layout was reverted after):
# the QuACK MLP with gate and up interleaved row by row (concat_layout=False, the layout bench/quack_mlp.py
# found 7% faster than the stacked one on an H100) on an H200 (an H100 came).
# Call A (bench/results/issue18-2026-12-05-s18/callA.sh, carrying .fa4a) ran first on the same warm machine; this
# call carries .fa4b and data/fp8-small. In order: the QuACK MLP's GPU tests; bench/quack_mlp.py at
# micro-batch 8's tokens; `threefold train` at micro-batch 8 with FA4, alternating the QuACK MLP and the
# default (only if the tests passed); power and SM clock once a second; all packed into $OUT/callE.tgz.
# Run as `bash <this> 2>&1 | tee $OUT/output.txt` from the device's repository root.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
. bench/fa4_unpack.sh .fa4b/part /tmp/fa4env || exit
out=/tmp/s39e; mkdir -p "$out"
git log --oneline -1 2>/dev/null | tee "$out/tree.txt"
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, quack, cutlass; print(torch.__version__, quack.__version__, cutlass.__version__)" \
  | tee -a "$out/gpu.txt"
echo "unpacked ($(( $(date +%s) - t0 )) s)"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
echo "== 1. GPU tests ($(( $(date +%s) - t0 )) s)"
timeout 200 python3 -m pytest -q -o addopts="" --tb=short -p no:logging -p no:cacheprovider -m gpu \
  tests/test_gpu.py -k quack > "$out/tests.txt" 2>&1
passed=$?
grep -vi warn "$out/tests.txt" | tail -25
echo "== 2. bench/quack_mlp.py ($(( $(date +%s) - t0 )) s)"
timeout 100 python3 bench/quack_mlp.py --tokens 16384 2>&1 | grep -vi warn | tail -12
if [ "$passed" = 0 ]; then
  for mlp in quack auto quack auto; do
    echo "== 3. threefold train, FA4, MLP $mlp ($(( $(date +%s) - t0 )) s)"
    dir=/tmp/train8-$mlp-fa4-$(date +%s)
    timeout 120 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
      --training.micro_batch_size=8 --training.global_batch_size=8 --data.path=data/fp8-small \
      --training.mlp_backend=$mlp --training.attention_backend=fa4 --logging.out_dir="$dir" > "$dir.log" 2>&1
    echo "mlp $mlp attention fa4 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$dir.log")"
    grep -iE "error|Traceback" "$dir.log" | head -5
    cp "$dir.log" "$out/"; cp "$dir/metrics.jsonl" "$out/$(basename "$dir").jsonl" 2>/dev/null
    [ $(( $(date +%s) - t0 )) -lt 470 ] || break
  done
fi
kill $smi
[ -n "${OUT:-}" ] && tar -C "$out" -czf "$OUT/callE.tgz" .
echo "total $(( $(date +%s) - t0 )) s"
