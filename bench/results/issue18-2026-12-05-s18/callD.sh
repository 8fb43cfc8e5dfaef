# FLAWED (found in the nineteenth session): the tree copies on PYTHONPATH were never imported, because
# `python3 -m threefold` run from the repository root puts the current directory first on sys.path; every
# run used this tree. Its step comparisons between trees measure nothing; see ../issue18-2026-12-05-s19/callE.sh.
# Call D (written in the eighteenth session, NOT RUN: three starts failed and too little device time was
# left; for the next session, carry data/fp8-corpus): FlexAttention with threefold's pinned Triton tiles
# (threefold.model.attention.FLEX_TILES, torch's autotuned pick from call C), off by default
# (attention.PIN_FLEX_TILES = False) until this call measures them:
# 1. the GPU test against per-document SDPA, torch's tiles and the pinned ones (eager, compiled);
# 2. bench/flex_configs.py with the backward tiles in torch's order (call C's script named them wrongly, so
#    its pinned backward variants other than the square ones failed to compile), and the pinned tiles;
# 3. document-masked `threefold bench` at seq 2048 micro-batch 8 and seq 8192 micro-batch 4, torch's tiles
#    (this tree) against the pinned ones (a copy with PIN_FLEX_TILES = True), interleaved, each its own
#    process; then `threefold train` masked on real text, the same two.
# Decision rule: turn PIN_FLEX_TILES on if the masked bench gains >= 0.5% at both shapes and the test passes.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/bench
t0=$(date +%s)
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
timeout 120 python3 -m pytest -q -m gpu tests/test_gpu.py -k flex_document_attention -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1
tail -n 1 $OUT/gpu_tests.txt; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.txt | head -5; echo "($(( $(date +%s) - t0 )) s)"
timeout 150 python3 bench/flex_configs.py > $OUT/flex_configs.txt 2>&1
grep -E "^  [a-z]|^b=" $OUT/flex_configs.txt; echo "($(( $(date +%s) - t0 )) s)"
rm -rf /tmp/pinned && mkdir -p /tmp/pinned && cp -r threefold /tmp/pinned/
sed -i 's/^PIN_FLEX_TILES = False/PIN_FLEX_TILES = True/' /tmp/pinned/threefold/model/attention.py
grep -q "^PIN_FLEX_TILES = True" /tmp/pinned/threefold/model/attention.py || exit 6
python3 -c "from pathlib import Path; import document_masking as dm; dm.write_dataset(Path('/tmp/packed'))" || exit 5
bench() {  # seq, micro-batch, tiles (torch / pinned)
  out=$OUT/bench-s$1-mb$2-$3-$(date +%s).jsonl
  tree=$PWD; [ $3 = pinned ] && tree=/tmp/pinned
  PYTHONPATH=$tree timeout 150 python3 -m threefold bench \
    --model.preset=llama-1b --model.max_seq_len=$1 --data.seq_len=$1 \
    --training.dtype=bfloat16 --training.device=cuda --training.compile=true --steps=10 --warmup=3 \
    --tokens=real --data.path=/tmp/packed --data.document_masking=true --data.reset_position_ids=true \
    --training.micro_batch_size=$2 --training.global_batch_size=$2 --json-out=$out > /tmp/bench.log 2>&1
  echo "bench s$1 mb$2 $3 rc=$? ($(( $(date +%s) - t0 )) s): $(python3 -c "
import json,sys; r=json.loads(open('$out').read().splitlines()[-1]); print(f\"{r['tokens_per_s_per_gpu']:,.0f} tokens/s, step {r['step_time_median_s']*1e3:.1f} ms, peak {r['peak_memory_gib']:.1f} GiB\")" 2>&1 | tail -1)"
}
train() {  # tiles
  dir=/tmp/train-masked-$1-$(date +%s); tree=$PWD; [ $1 = pinned ] && tree=/tmp/pinned
  PYTHONPATH=$tree timeout 120 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --data.document_masking=true --logging.out_dir=$dir > $dir.log 2>&1
  echo "train masked mb8 $1 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" $dir.log)"; grep -m2 Error $dir.log
}
for run in "bench 2048 8 torch" "bench 2048 8 pinned" "bench 8192 4 torch" "bench 8192 4 pinned" \
           "bench 2048 8 torch" "bench 2048 8 pinned" "train torch" "train pinned"; do
  [ $(( $(date +%s) - t0 )) -lt 440 ] || break
  $run
done
echo "total $(( $(date +%s) - t0 )) s"
