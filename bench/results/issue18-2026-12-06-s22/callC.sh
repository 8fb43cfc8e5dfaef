# Call C (twenty-second session), after call B on the same warm machine (carry .tt and data/fp8-corpus):
# TorchTitan v0.2.2 and threefold side by side (`bench/torchtitan_side_by_side.sh`, batch 8 then 4), then,
# where call B left FlashAttention-4 unpacked in /tmp/fa4site and time is left, the two document-attention
# GPU tests.
t0=$(date +%s)
out=${OUT:-/tmp/callC}; mkdir -p "$out"
OUT=$out bash bench/torchtitan_side_by_side.sh
site=/tmp/fa4site
if [ -d $site/flash_attn ] && [ $(( $(date +%s) - t0 )) -lt 420 ]; then
  PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD timeout $(( 560 - ($(date +%s) - t0) )) \
    python3 -m pytest -q -m gpu tests/test_gpu.py -k "flex_document_attention or fa4_document_attention" \
    2>&1 | tail -15 | tee "$out/gpu_tests.txt"
fi
echo "total $(( $(date +%s) - t0 )) s"
