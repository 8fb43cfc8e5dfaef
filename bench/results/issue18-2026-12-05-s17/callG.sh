# Call G (seventeenth session), on call F's warm machine (carry .fa4b and data/fp8-corpus): document masking
# through FA4's variable-length kernels (threefold.model.fa4.fa4_document_attention, new) against
# FlexAttention's block mask: the GPU tests, then llama-1b steps with document masking, bf16, compile,
# each its own process, interleaved flex / fa4:
# - `threefold bench --tokens=real` on packed random documents (bench/document_masking.py's dataset:
#   log-normal lengths, median 1,024 tokens) at seq 2048 micro-batch 8 and seq 8192 micro-batch 4;
# - `threefold train bench/fp8_loss.toml --data.document_masking=true` on real text (70 steps).
export PYTHONUNBUFFERED=1
t0=$(date +%s)
site=/tmp/fa4site
if [ ! -d $site/flash_attn ]; then
  [ -s /tmp/fa4parts/a ] || { echo "call F's part is not here: a fresh machine"; exit 3; }
  mkdir -p $site && cat /tmp/fa4parts/a .fa4b/part | xz -d | tar -C $site -xf - || exit 4
fi
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
echo "unpacked ($(( $(date +%s) - t0 )) s)"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -k fa4 -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1
tail -n 3 $OUT/gpu_tests.txt; grep -E "^(FAILED|ERROR)|Error" $OUT/gpu_tests.txt | head -5; echo "($(( $(date +%s) - t0 )) s)"
PYTHONPATH=$PYTHONPATH:$PWD/bench python3 -c "
from pathlib import Path; import document_masking as dm; dm.write_dataset(Path('/tmp/packed'))" || exit 5
bench() {  # seq, micro-batch, backend
  out=$OUT/bench-s$1-mb$2-$3.jsonl
  timeout 150 python3 -m threefold bench --model.preset=llama-1b --model.max_seq_len=$1 --data.seq_len=$1 \
    --training.dtype=bfloat16 --training.device=cuda --training.compile=true --steps=10 --warmup=3 \
    --tokens=real --data.path=/tmp/packed --data.document_masking=true --data.reset_position_ids=true \
    --training.micro_batch_size=$2 --training.global_batch_size=$2 --training.attention_backend=$3 \
    --json-out=$out > $OUT/bench-s$1-mb$2-$3.log 2>&1
  echo "bench s$1 mb$2 $3 rc=$? ($(( $(date +%s) - t0 )) s): $(python3 -c "
import json,sys; r=json.loads(open('$out').read().splitlines()[-1]); print(f\"{r['tokens_per_s_per_gpu']:,.0f} tokens/s, step {r['step_time_median_s']*1e3:.1f} ms, peak {r['peak_memory_gib']:.1f} GiB\")" 2>&1 | tail -1)"
}
train() {  # backend
  dir=/tmp/train-masked-$1-$(date +%s)
  timeout 120 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --data.document_masking=true --training.attention_backend=$1 --logging.out_dir=$dir > $dir.log 2>&1
  echo "train masked mb8 $1 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" $dir.log)"; grep -m2 Error $dir.log
  cp $dir/metrics.jsonl $OUT/$(basename $dir).jsonl
}
bench 2048 8 auto; bench 2048 8 fa4
for run in "bench 8192 4 auto" "bench 8192 4 fa4" "train auto" "train fa4"; do
  [ $(( $(date +%s) - t0 )) -lt 420 ] || break
  $run
done
echo "total $(( $(date +%s) - t0 )) s"
