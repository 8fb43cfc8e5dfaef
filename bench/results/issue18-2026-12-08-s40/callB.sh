# Call B (fortieth session): after call A (bench/results/issue18-2026-12-05-s18/callA.sh, carrying .fa4a) on
# the same warm machine; this call carries .fa4b, .tt and data/fp8-small. TorchTitan v0.2.2 beside
# threefold at batch 8 (bench/torchtitan_side_by_side.sh 8), threefold with FA4 and the QuACK MLP (stacked
# layout, main's), then FA4 with the default MLP, rounds repeated while under ROUND_S seconds (default 200
# here); power and SM clock once a second. Everything is written under $OUT as it goes, so a run cut short
# still returns what finished. Run as `bash <this> 2>&1 | tee $OUT/output.txt` from the repository root.
export PYTHONUNBUFFERED=1
. bench/fa4_unpack.sh .fa4b/part /tmp/fa4env || exit
out=${OUT:-/tmp/s40b}; mkdir -p "$out"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
TF_ARGS="--data.path=data/fp8-small" BACKENDS="fa4:quack fa4" ROUND_S=${ROUND_S:-200} \
  OUT=$out/side bash bench/torchtitan_side_by_side.sh 8
kill $smi
