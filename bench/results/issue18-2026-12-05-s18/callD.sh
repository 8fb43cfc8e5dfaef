# Call D (eighteenth session; carry data/fp8-corpus): FlexAttention with threefold's pinned Triton tiles
# (threefold.model.attention.FLEX_TILES, torch's autotuned pick from call C) on Hopper:
# 1. the GPU test against per-document SDPA (eager, compiled);
# 2. bench/flex_configs.py with the backward tiles now given in torch's order (call C's script named them
#    wrongly, so its pinned backward variants other than the square ones failed to compile);
# 3. document-masked `threefold bench` at seq 2048 micro-batch 8 and seq 8192 micro-batch 4, torch's default
#    tiles (the previous commit's attention.py, carried as old_attention.py) against the pinned ones,
#    interleaved, each its own process; then `threefold train` masked on real text, the same two.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/bench
t0=$(date +%s)
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 80 python3 -m pytest -q -m gpu tests/test_gpu.py -k flex_document_attention -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1
tail -n 1 $OUT/gpu_tests.txt; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.txt | head -5; echo "($(( $(date +%s) - t0 )) s)"
# (bench/flex_configs.py dropped here: three failed starts left 362 s of device time)
rm -rf /tmp/old && mkdir -p /tmp/old && cp -r threefold /tmp/old/ && cp old_attention.py /tmp/old/threefold/model/attention.py
python3 -c "from pathlib import Path; import document_masking as dm; dm.write_dataset(Path('/tmp/packed'))" || exit 5
bench() {  # seq, micro-batch, tree (old / new)
  out=$OUT/bench-s$1-mb$2-$3.jsonl
  tree=$PWD; [ $3 = old ] && tree=/tmp/old
  PYTHONPATH=$tree timeout 75 python3 -m threefold bench \
    --model.preset=llama-1b --model.max_seq_len=$1 --data.seq_len=$1 \
    --training.dtype=bfloat16 --training.device=cuda --training.compile=true --steps=10 --warmup=3 \
    --tokens=real --data.path=/tmp/packed --data.document_masking=true --data.reset_position_ids=true \
    --training.micro_batch_size=$2 --training.global_batch_size=$2 --json-out=$out > /tmp/bench-s$1-mb$2-$3.log 2>&1
  echo "bench s$1 mb$2 $3 rc=$? ($(( $(date +%s) - t0 )) s): $(python3 -c "
import json,sys; r=json.loads(open('$out').read().splitlines()[-1]); print(f\"{r['tokens_per_s_per_gpu']:,.0f} tokens/s, step {r['step_time_median_s']*1e3:.1f} ms, peak {r['peak_memory_gib']:.1f} GiB\")" 2>&1 | tail -1)"
}
train() {  # tree
  dir=/tmp/train-masked-$1-$(date +%s); tree=$PWD; [ $1 = old ] && tree=/tmp/old
  PYTHONPATH=$tree timeout 120 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --data.document_masking=true --logging.out_dir=$dir > $dir.log 2>&1
  echo "train masked mb8 $1 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" $dir.log)"; grep -m2 Error $dir.log
}
for run in "bench 2048 8 old" "bench 2048 8 new" "bench 8192 4 old" "bench 8192 4 new" "bench 2048 8 old" \
           "bench 2048 8 new" "train old" "train new"; do
  [ $(( $(date +%s) - t0 )) -lt 140 ] || break
  $run
done
echo "total $(( $(date +%s) - t0 )) s"
