# Call B (fifteenth session), on call A's warm machine: unpack FlashAttention-4, the attention kernels side
# by side at llama-1b's shape, the GPU tests of the fa4 backend, then bf16 micro-batch 8 with torch's
# attention (cuDNN) and with FA4, interleaved, each its own process.
export PYTHONUNBUFFERED=1
# Run as: A=/tmp/fa4parts/a; mkdir -p .fa4a && cp $A .fa4a/part && bash bench/results/issue18-2026-12-05-s15/callB.sh (carry .fa4b): (call A's part was
# copied to the machine's /tmp in between)
t0=$(date +%s)
if [ ! -s .fa4a/part ]; then echo "call A's part is not here: a fresh machine"; exit 3; fi
[ -d .fa4site/flash_attn ] || mkdir -p .fa4site && cat .fa4a/part .fa4b/part | xz -d | tar -C .fa4site -xf - || exit 4
export PYTHONPATH=$PWD/.fa4site:$PWD/.fa4site/nvidia_cutlass_dsl/dsl_packages:$PWD
python3 -c "import flash_attn.cute.interface, cutlass; print('fa4 imports')" 2>&1 | tail -3
timeout 150 python3 bench/attention_kernels.py --batch 8 > $OUT/attn8.txt 2>&1; cat $OUT/attn8.txt | tail -12
echo "($(( $(date +%s) - t0 )) s)"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -k fa4 -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1
tail -5 $OUT/gpu_tests.txt
echo "($(( $(date +%s) - t0 )) s)"
for backend in auto fa4; do
  [ $(( $(date +%s) - t0 )) -lt 430 ] || break
  timeout 150 python3 bench/fp8.py --modes false --micro-batches 8 --budget 90 --attention-backend $backend \
    > $OUT/mb8_$backend.txt 2>&1
  grep -E "tok/s|FAILED|Error" $OUT/mb8_$backend.txt | head -5
done
echo "total $(( $(date +%s) - t0 )) s"
