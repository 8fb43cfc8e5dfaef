# Call F (thirty-ninth session; ran on an H100 with the tree at c045509), on the machine that ran call E:
# TorchTitan v0.2.2 and threefold side by side at batch 8 (bench/torchtitan_side_by_side.sh 8), threefold
# with FA4 and the interleaved QuACK MLP. Written for an H200; an H100 came. The packages stay unpacked from
# call E (nothing of FA4's carried); carries .tt and data/fp8-small. ROUND_S (environment) as in the
# side-by-side script, default 200 here.
# Run as `bash <this> 2>&1 | tee $OUT/output.txt` from the device's repository root.
export PYTHONUNBUFFERED=1
. bench/fa4_unpack.sh /nonexistent /tmp/fa4env || exit
out=/tmp/s39f; mkdir -p "$out"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
TF_ARGS="--data.path=data/fp8-small --training.mlp_backend=quack" BACKENDS=fa4 ROUND_S=${ROUND_S:-200} \
  OUT=$out/side bash bench/torchtitan_side_by_side.sh 8
kill $smi
[ -n "${OUT:-}" ] && tar -C "$out" -czf "$OUT/callF.tgz" .
