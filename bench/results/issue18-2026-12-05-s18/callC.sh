# Call C (eighteenth session; carry .tt and data/fp8-corpus): FlexAttention's tile sizes for document-masked
# attention at llama-1b's attention shape (bench/flex_configs.py, with torch's own autotuning); on an H200,
# then the TorchTitan side by side (bench/torchtitan_side_by_side.sh) for the absolute targets.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/bench
t0=$(date +%s)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$gpu"
timeout 300 python3 bench/flex_configs.py --autotune > $OUT/flex_configs.txt 2>&1
grep -v -i "warn" $OUT/flex_configs.txt | tail -n 30; echo "($(( $(date +%s) - t0 )) s)"
case "$gpu" in
  *H200*) OUT=$OUT timeout 280 bash bench/torchtitan_side_by_side.sh "8 4" ;;
esac
echo "total $(( $(date +%s) - t0 )) s"
