# Call C (thirty-seventh session), on call A's warm machine (`../issue18-2026-12-05-s18/callA.sh`, carry
# .fa4a, which keeps the first 46,000,000 bytes of FA4's packed packages in the machine's /tmp); this call
# carries .fa4b (the rest: `bash bench/fa4_pack.sh` makes both) and data/fp8-small. QuACK, which comes with
# FA4, has GEMMs with SwiGLU in their epilogues (`training.mlp_backend = "quack"`, new):
#   `threefold train bench/fp8_loss.toml` at micro-batch 8 on data/fp8-small, 70 steps, the MLP backend
#   auto, then quack (each its own process); the GPU tests of the QuACK MLP (tests/test_gpu.py -k quack);
#   quack and auto again while time allows, then both with FA4 as the attention kernel (while under MORE
#   seconds, default 0: not run), then bench/quack_mlp.py (llama-1b's MLP alone through QuACK against the
#   compiled torch MLP, micro-batch 8's and 4's tokens);
# with the card's power and SM clock sampled once a second throughout.
# Run as `PYTHONPATH=$PWD bash <this> 2>&1 | tee $OUT/output.txt` from the device's repository root.
# It ran at 18fce4a (MORE=420, one H200, 2026-12-07 18:14 UTC; output in callC/). QuACK's MLP failed to build
# there, and main took `training.mlp_backend` back out at the next commit: it lives on the branch quack-mlp.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
site=/tmp/fa4site
if [ ! -d $site/flash_attn ]; then
  [ -s /tmp/fa4parts/a ] || { echo "call A's part is not here: a fresh machine"; exit 3; }
  mkdir -p $site && cat /tmp/fa4parts/a .fa4b/part | xz -d | tar -C $site -xf - || exit 4
fi
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
out=${OUT:-/tmp/s37c}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader
python3 -c "import torch, quack; print('torch', torch.__version__, 'quack', quack.__version__)"
echo "unpacked ($(( $(date +%s) - t0 )) s)"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
train() {  # mlp backend, attention backend
  dir=/tmp/train8-$1-$2-$(date +%s)
  timeout 150 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.micro_batch_size=8 --training.global_batch_size=8 --data.path=data/fp8-small \
    --training.mlp_backend="$1" --training.attention_backend="$2" --logging.out_dir="$dir" > "$dir.log" 2>&1
  echo "mlp $1 attention $2 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$dir.log")"
  grep -iE "error|Traceback" "$dir.log" | head -5
  cp "$dir/metrics.jsonl" "$out/$(basename "$dir").jsonl" 2>/dev/null
}
left() { [ $(( $(date +%s) - t0 )) -lt "$1" ]; }  # seconds since the start below $1
echo "== threefold train, micro-batch 8 ($(( $(date +%s) - t0 )) s)"
train auto auto
train quack auto
echo "== GPU tests ($(( $(date +%s) - t0 )) s)"
timeout 150 python3 -m pytest -q -o addopts="" --tb=short -p no:logging -p no:cacheprovider -m gpu \
  tests/test_gpu.py -k quack 2>&1 | tail -25
left 330 && train quack auto
left 390 && train auto auto
if left "${MORE:-0}"; then
  for m in quack auto; do train $m fa4; done
fi
left 420 && { echo "== bench/quack_mlp.py ($(( $(date +%s) - t0 )) s)"; timeout 100 python3 bench/quack_mlp.py --tokens 16384 8192; }
kill $smi
echo "total $(( $(date +%s) - t0 )) s"
