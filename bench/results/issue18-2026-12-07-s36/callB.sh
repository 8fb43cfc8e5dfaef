# Call B (thirty-sixth session), on call A's warm machine (`../issue18-2026-12-05-s18/callA.sh`, carry .fa4a,
# which keeps the first 46,000,000 bytes of FA4's packed packages in the machine's /tmp); this call carries
# .fa4b (the rest), .tt and data/fp8-small (the first 584 documents of data/fp8-corpus's source, prepared the
# same way: `head -n 584 data/fp8-src/code.jsonl > data/fp8-small-src/code.jsonl`, `threefold data prepare
# data/fp8-small-src/code.jsonl --out data/fp8-small`; the whole corpus
# leaves no room in a call's 64 MiB beside the tree and the part). bench/torchtitan_side_by_side.sh with
# threefold run both with torch's attention and with FlashAttention-4 after each TorchTitan run: one round of
# batches 8 and 4 (FIRST, environment: other batches), then a second round of batch 8 with the two backends
# in the other order; the card's power draw and SM clock sampled once a second throughout.
# Run as `PYTHONPATH=$PWD bash <this>` from the device's repository root. The parts: `bash bench/fa4_pack.sh`
# (this call's were packed by hand the same way, the CuTe DSL's aarch64 stubs kept: 656 bytes more).
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=/tmp/s36b; mkdir -p "$out"  # packed into $OUT/callB.tgz at the end (a reply brings back 8 files at most)
site=/tmp/fa4site
if [ ! -d $site/flash_attn ]; then
  [ -s /tmp/fa4parts/a ] || { echo "call A's part is not here: a fresh machine"; exit 3; }
  mkdir -p $site && cat /tmp/fa4parts/a .fa4b/part | xz -d | tar -C $site -xf - || exit 4
fi
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
python3 -c "import flash_attn.cute, quack; print('FA4 imports')" 2>&1 | tail -1
echo "unpacked ($(( $(date +%s) - t0 )) s)"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
TF_ARGS=--data.path=data/fp8-small BACKENDS="auto fa4" ROUND_S=1 OUT=$out/round1 bash bench/torchtitan_side_by_side.sh "${FIRST:-8 4}"
if [ $(( $(date +%s) - t0 )) -lt ${LIMIT:-400} ]; then
  TF_ARGS=--data.path=data/fp8-small BACKENDS="fa4 auto" ROUND_S=1 OUT=$out/round2 bash bench/torchtitan_side_by_side.sh "8"
fi
kill $smi
[ -n "${OUT:-}" ] && tar -C "$out" -czf "$OUT/callB.tgz" .
echo "total $(( $(date +%s) - t0 )) s"
