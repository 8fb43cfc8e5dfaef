# The thirty-fifth session's second call (carry .tt and data/fp8-corpus): on an H200, one more round of
# bench/torchtitan_side_by_side.sh "8 4" (TorchTitan v0.2.2 and `threefold train`, bf16), with the card's
# power draw and SM clock sampled once a second; on any other card nothing.
name=$(nvidia-smi --query-gpu=name --format=csv,noheader)
echo "card: $name"
case "$name" in *H200*) ;; *) echo "not an H200: nothing run"; exit 0 ;; esac
out=$OUT/round2; mkdir -p "$out"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
ROUND_S=1 OUT=$out bash bench/torchtitan_side_by_side.sh "8 4"
kill $smi
