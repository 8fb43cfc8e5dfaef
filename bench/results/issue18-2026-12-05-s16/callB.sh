# Call B (sixteenth session), on call A's warm machine (carry .fa4b and data/fp8-corpus): unpack
# FlashAttention-4, its GPU tests, then bf16 on the bench path with torch's attention and FA4 interleaved,
# micro-batch 8 and 4, each its own process, the card's power and clock logged every 500 ms.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
site=/tmp/fa4site
if [ ! -d $site/flash_attn ]; then
  [ -s /tmp/fa4parts/a ] || { echo "call A's part is not here: a fresh machine"; exit 3; }
  mkdir -p $site && cat /tmp/fa4parts/a .fa4b/part | xz -d | tar -C $site -xf - || exit 4
fi
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
echo "unpacked ($(( $(date +%s) - t0 )) s)"
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv -lms 500 > $OUT/power.csv 2>&1 &
smi=$!
timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py -k fa4 -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1; tail -n 2 $OUT/gpu_tests.txt
for run in "8 fa4" "8 auto" "4 auto" "4 fa4" "8 fa4"; do
  set -- $run
  [ $(( $(date +%s) - t0 )) -lt 470 ] || break
  echo "start mb$1 $2 $(date +%T)" >> $OUT/runs.txt
  timeout 110 python3 bench/fp8.py --modes false --micro-batches $1 --budget 80 --attention-backend $2 \
    > $OUT/mb$1_$2_$(date +%s).txt 2>&1
  echo "mb$1 $2: $(grep -h -E "tok/s|FAILED|Error" $OUT/mb$1_$2_*.txt | tail -1) ($(( $(date +%s) - t0 )) s)" | tee -a $OUT/runs.txt
done
kill $smi
echo "total $(( $(date +%s) - t0 )) s"
