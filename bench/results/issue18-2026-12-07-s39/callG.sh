# Call G (thirty-ninth session; written, not run: no machine came for it): the QuACK MLP's two weight
# layouts and the default MLP on one machine. Call E (c045509's interleaved layout, one H100) found QuACK
# 0.2% behind the default where session 38's stacked layout (main's) had been 0.9% ahead on another H100;
# this call runs the three side by side to say whether the layout or the card made the difference. Call A
# (bench/results/issue18-2026-12-05-s18/callA.sh, carrying .fa4a) first; this call carries .fa4b and
# data/fp8-small. The interleaved layout is made by rewriting this machine's copy of
# threefold/model/quack_mlp.py for its runs (torch.stack([gate, up], dim=1).flatten(0, 1) with
# concat_layout=False, c045509's two lines), restored after. `threefold train` at micro-batch 8 with FA4,
# in the order stacked, interleaved, default, twice; power and SM clock once a second; all packed into
# $OUT/callG.tgz. RUNS (environment) sets other runs, e.g. RUNS="stacked interleaved auto" for one each.
# Run as `bash <this> 2>&1 | tee $OUT/output.txt` from the device's repository root.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
. bench/fa4_unpack.sh .fa4b/part /tmp/fa4env || exit
out=/tmp/s39g; mkdir -p "$out"
src=threefold/model/quack_mlp.py
cp "$src" /tmp/quack_mlp.stacked.py
python3 - "$src" /tmp/quack_mlp.interleaved.py <<'PY'
import sys
text = open(sys.argv[1]).read()
for old, new in [("torch.cat([gate, up])", "torch.stack([gate, up], dim=1).flatten(0, 1)"),
                 ("concat_layout=True", "concat_layout=False")]:
    assert text.count(old) == 1, old
    text = text.replace(old, new)
open(sys.argv[2], "w").write(text)
PY
[ -s /tmp/quack_mlp.interleaved.py ] || exit 5
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader | tee "$out/gpu.txt"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
for run in ${RUNS:-stacked interleaved auto stacked interleaved auto}; do
  mlp=quack
  case $run in
    stacked) cp /tmp/quack_mlp.stacked.py "$src" ;;
    interleaved) cp /tmp/quack_mlp.interleaved.py "$src" ;;
    auto) mlp=auto ;;
  esac
  dir=/tmp/train8-$run-$(date +%s)
  timeout 120 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.micro_batch_size=8 --training.global_batch_size=8 --data.path=data/fp8-small \
    --training.mlp_backend=$mlp --training.attention_backend=fa4 --logging.out_dir="$dir" > "$dir.log" 2>&1
  echo "$run rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$dir.log")"
  grep -iE "error|Traceback" "$dir.log" | head -5
  cp "$dir.log" "$out/"; cp "$dir/metrics.jsonl" "$out/$(basename "$dir").jsonl" 2>/dev/null
  cp /tmp/quack_mlp.stacked.py "$src"
  [ $(( $(date +%s) - t0 )) -lt 480 ] || break
done
kill $smi
[ -n "${OUT:-}" ] && tar -C "$out" -czf "$OUT/callG.tgz" .
echo "total $(( $(date +%s) - t0 )) s"
