# Call D (twenty-second session), for an H200 only, on call A's warm machine (`../issue18-2026-12-05-s18/callA.sh`,
# carry .fa4a, now the first 60,000,000 bytes of FA4's packed packages; then this, carry .fa4b, .tt and
# data/fp8-corpus, 58.7 MB together): TorchTitan v0.2.2 against `threefold train` with torch's attention
# (auto) and with FA4, batch 8 then 4 (`BACKENDS="auto fa4" bash bench/torchtitan_side_by_side.sh`), with the
# card's power and SM clock sampled once a second. Stops at once on any other card.
t0=$(date +%s)
out=${OUT:-/tmp/callD}; mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$gpu"
case "$gpu" in *H200*) ;; *) echo "not an H200: the issue's targets are H200 figures; stopping"; exit 7 ;; esac
site=/tmp/fa4site
if [ ! -d $site/flash_attn ]; then
  [ -s /tmp/fa4parts/a ] || { echo "call A's part is not here: a fresh machine"; exit 3; }
  mkdir -p $site && cat /tmp/fa4parts/a .fa4b/part | xz -d | tar -C $site -xf - || exit 4
fi
echo "unpacked ($(( $(date +%s) - t0 )) s)"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages OUT=$out BACKENDS="auto fa4" bash bench/torchtitan_side_by_side.sh
kill $smi
echo "total $(( $(date +%s) - t0 )) s"
