# Call B (twenty-second session), on call A's warm machine (`../issue18-2026-12-05-s18/callA.sh`, carry .fa4a;
# then this, carry .fa4b and data/fp8-corpus). On an H200: the issue's headline through `threefold train` on
# real text, unmasked, llama-1b, seq 2048, bf16, compile, torch's attention (auto) against FA4, micro-batch 8
# and 4, each run its own process, interleaved, twice (as `../issue18-2026-12-05-s19/callH.sh`, with each
# run's log and metrics kept under $OUT and the card's power and SM clock sampled once a second).
# On any other card: the two document-attention GPU tests (FA4 and FlexAttention) instead.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/callB}; mkdir -p "$out"
site=/tmp/fa4site
if [ ! -d $site/flash_attn ]; then
  [ -s /tmp/fa4parts/a ] || { echo "call A's part is not here: a fresh machine"; exit 3; }
  mkdir -p $site && cat /tmp/fa4parts/a .fa4b/part | xz -d | tar -C $site -xf - || exit 4
fi
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print(torch.__version__)" | tee -a "$out/gpu.txt"
echo "unpacked ($(( $(date +%s) - t0 )) s)"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader)
case "$gpu" in
  *H200*) ;;
  *) echo "not an H200: the document-attention GPU tests instead"
     timeout 400 python3 -m pytest -q -m gpu tests/test_gpu.py -k "flex_document_attention or fa4_document_attention" \
       2>&1 | tail -15 | tee "$out/gpu_tests.txt"
     echo "total $(( $(date +%s) - t0 )) s"; exit 0 ;;
esac
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv,noheader -l 1 > "$out/smi.csv" 2>&1 &
smi=$!
train() {  # backend, micro-batch
  name=train-$1-mb$2-$(date +%s)
  dir=/tmp/$name
  timeout 120 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.micro_batch_size=$2 --training.global_batch_size=$2 \
    --training.attention_backend=$1 --logging.out_dir=$dir > "$out/$name.log" 2>&1
  echo "train $1 mb$2 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$out/$name.log")"
  grep -m2 Error "$out/$name.log"
  cp "$dir/metrics.jsonl" "$out/$name.jsonl" 2>/dev/null
}
for run in "auto 8" "fa4 8" "auto 4" "fa4 4" "auto 8" "fa4 8" "auto 4" "fa4 4"; do
  [ $(( $(date +%s) - t0 )) -lt ${LIMIT:-470} ] || break  # LIMIT: no run starts after this many seconds
  train $run
done
kill $smi
echo "total $(( $(date +%s) - t0 )) s"
