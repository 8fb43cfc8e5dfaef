# Call C (thirty-eighth session), on the machine that ran call B: TorchTitan and threefold side by side at
# batch 8 on an H200 (one round of bench/torchtitan_side_by_side.sh, threefold with torch's attention and
# with FA4), then threefold with FA4 and the QuACK MLP once more in the same call. Carries .fa4b, .tt and
# data/fp8-small; the packages stay unpacked from call B. Output packed into $OUT/callC.tgz. BACKENDS
# (environment) overrides threefold's attention backends beside TorchTitan, default "auto fa4".
# Run as `PYTHONPATH=$PWD bash <this> 2>&1 | tee $OUT/output.txt` from the device's repository root.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
. bench/fa4_unpack.sh .fa4b/part /tmp/fa4env || exit
out=/tmp/s38c; mkdir -p "$out"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
TF_ARGS=--data.path=data/fp8-small BACKENDS=${BACKENDS:-"auto fa4"} ROUND_S=1 OUT=$out/side bash bench/torchtitan_side_by_side.sh 8
if [ "${QUACK:-1}" = 1 ]; then
  dir=/tmp/train8-quack-fa4-$(date +%s)
  timeout 150 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.micro_batch_size=8 --training.global_batch_size=8 --data.path=data/fp8-small \
    --training.mlp_backend=quack --training.attention_backend=fa4 --logging.out_dir="$dir" > "$dir.log" 2>&1
  echo "threefold mlp quack attention fa4 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$dir.log")"
  cp "$dir.log" "$out/"; cp "$dir/metrics.jsonl" "$out/$(basename "$dir").jsonl" 2>/dev/null
fi
kill $smi
[ -n "${OUT:-}" ] && tar -C "$out" -czf "$OUT/callC.tgz" .
echo "total $(( $(date +%s) - t0 )) s"
