# Call E (twenty-fifth session), carry .tt, data/fp8-corpus and .old: on an H200, the side by side with
# TorchTitan v0.2.2 through both trainers (`bash bench/torchtitan_side_by_side.sh`, torch's attention; the
# issue's bf16 targets are H200 figures, none measured since the fourteenth session); on any other card,
# call D (the transposed cast's vector scale read against the old).
out=${OUT:-/tmp/s25e}; mkdir -p "$out"
case "$(nvidia-smi --query-gpu=name --format=csv,noheader)" in
  *H200*) nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
          smi=$!
          OUT=$out bash bench/torchtitan_side_by_side.sh
          kill $smi ;;
  *) OUT=$out bash bench/results/issue18-2026-12-06-s25/callD.sh ;;
esac
