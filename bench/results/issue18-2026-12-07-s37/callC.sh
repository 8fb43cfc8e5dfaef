# Call C (thirty-seventh session), on call A's warm machine (`../issue18-2026-12-05-s18/callA.sh`, carry
# .fa4a, which keeps the first 46,000,000 bytes of FA4's packed packages in the machine's /tmp); this call
# carries .fa4b (the rest: `bash bench/fa4_pack.sh` makes both). QuACK, which comes with FA4, has GEMMs with
# SwiGLU in their epilogues: bench/quack_mlp.py times llama-1b's MLP through them against the compiled
# torch MLP, at micro-batch 8's and 4's tokens, with the card's power and SM clock sampled once a second.
# Run as `PYTHONPATH=$PWD bash <this> 2>&1 | tee $OUT/output.txt` from the device's repository root.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
site=/tmp/fa4site
if [ ! -d $site/flash_attn ]; then
  [ -s /tmp/fa4parts/a ] || { echo "call A's part is not here: a fresh machine"; exit 3; }
  mkdir -p $site && cat /tmp/fa4parts/a .fa4b/part | xz -d | tar -C $site -xf - || exit 4
fi
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader
python3 -c "import torch, quack; print('torch', torch.__version__, 'quack', quack.__version__)"
echo "unpacked ($(( $(date +%s) - t0 )) s)"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "${OUT:-/tmp}/smi.csv" 2>&1 &
smi=$!
python3 bench/quack_mlp.py --tokens 16384 8192
kill $smi
echo "total $(( $(date +%s) - t0 )) s"
