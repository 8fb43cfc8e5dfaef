# Call D (twenty-second session), for an H200 only, on call A's warm machine. FA4's packed packages (71.6 MB)
# and the side by side's inputs do not fit one call's 64 MiB with the tree, so the packages go ahead in two
# calls to the machine's /tmp: `../issue18-2026-12-05-s18/callA.sh` (carry .fa4a), then
# `mkdir -p /tmp/fa4parts && cp .fa4b/part /tmp/fa4parts/b` (carry .fa4b); then this (carry .tt and
# data/fp8-corpus): TorchTitan v0.2.2 against `threefold train` with torch's attention
# (auto) and with FA4, batch 8 then 4 (`BACKENDS="auto fa4" bash bench/torchtitan_side_by_side.sh`), with the
# card's power and SM clock sampled once a second. Stops at once on any other card.
t0=$(date +%s)
out=${OUT:-/tmp/callD}; mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$gpu"
case "$gpu" in *H200*) ;; *) echo "not an H200: the issue's targets are H200 figures; stopping"; exit 7 ;; esac
site=/tmp/fa4site
if [ ! -d $site/flash_attn ]; then
  [ -s /tmp/fa4parts/a ] && [ -s /tmp/fa4parts/b ] || { echo "the parts are not here: a fresh machine"; exit 3; }
  mkdir -p $site && cat /tmp/fa4parts/a /tmp/fa4parts/b | xz -d | tar -C $site -xf - || exit 4
fi
echo "unpacked ($(( $(date +%s) - t0 )) s)"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages OUT=$out BACKENDS="auto fa4" bash bench/torchtitan_side_by_side.sh
kill $smi
echo "total $(( $(date +%s) - t0 )) s"
