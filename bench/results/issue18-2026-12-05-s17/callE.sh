# Call E (seventeenth session), on call D's warm machine (carry .fa4b): unpack FlashAttention-4; the
# document-masked attention kernels side by side (bench/fa4_varlen.py): is FA4's variable-length path
# worth building into threefold's document masking?
export PYTHONUNBUFFERED=1
t0=$(date +%s)
site=/tmp/fa4site
if [ ! -d $site/flash_attn ]; then
  [ -s /tmp/fa4parts/a ] || { echo "call D's part is not here: a fresh machine"; exit 3; }
  mkdir -p $site && cat /tmp/fa4parts/a .fa4b/part | xz -d | tar -C $site -xf - || exit 4
fi
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD:$PWD/bench
echo "unpacked ($(( $(date +%s) - t0 )) s)"
timeout 400 python3 bench/fa4_varlen.py --shapes 8x2048,4x2048,2x8192 --medians 1024,256 2>&1 | tee $OUT/fa4_varlen.txt | grep -v Warning
echo "total $(( $(date +%s) - t0 )) s"
