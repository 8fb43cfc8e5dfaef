# Call E (nineteenth session; carry nothing: old_attention.py, the attention.py of d3f3e5d^, travels as an
# untracked file for this call only). Call D and the eighteenth session's call B compared tree copies by
# PYTHONPATH while running `python3 -m threefold` from the repository root, where Python puts the current
# directory first on sys.path: every run imported this tree, so "pinned" and "old" were this code too. Here
# PYTHONSAFEPATH=1 keeps the current directory off sys.path, and each tree's process prints what it imported.
# Document-masked `threefold bench` (packed random documents, median 1,024), llama-1b, bf16, compile,
# interleaved, each its own process:
#   old    FlexAttention's mask through create_block_mask (before d3f3e5d)
#   new    the mask from each tile's first and last document id, torch's tiles (PIN_FLEX_TILES = False)
#   pinned the same with PIN_FLEX_TILES = True (attention.FLEX_TILES)
# As run (f9f4476) "new" was the tree itself, whose PIN_FLEX_TILES was then False; it is True since, so the
# script now makes both copies. Without old_attention.py it skips the "old" runs.
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
t0=$(date +%s)
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
rm -rf /tmp/old /tmp/new /tmp/pinned && mkdir -p /tmp/old /tmp/new /tmp/pinned
trees="/tmp/new /tmp/pinned"
if [ -s old_attention.py ]; then
  cp -r threefold /tmp/old/ && cp old_attention.py /tmp/old/threefold/model/attention.py && trees="/tmp/old $trees"
fi
for t in new:False pinned:True; do
  cp -r threefold /tmp/${t%:*}/
  sed -i -E "s/^PIN_FLEX_TILES = (True|False)/PIN_FLEX_TILES = ${t#*:}/" /tmp/${t%:*}/threefold/model/attention.py
done
for tree in $trees; do
  PYTHONPATH=$tree python3 -c "
import threefold.model.attention as a
print(a.__file__, 'tile mask:', hasattr(a, '_document_block_mask'), 'pinned:', getattr(a, 'PIN_FLEX_TILES', None))"
done
PYTHONPATH=$PWD:$PWD/bench python3 -c "from pathlib import Path; import document_masking as dm; dm.write_dataset(Path('/tmp/packed'))" || exit 5
bench() {  # seq, micro-batch, tree (old / new / pinned)
  out=$OUT/bench-s$1-mb$2-$3-$(date +%s).jsonl
  tree=/tmp/$3; [ -d $tree/threefold ] || return 0
  PYTHONPATH=$tree timeout 150 python3 -m threefold bench \
    --model.preset=llama-1b --model.max_seq_len=$1 --data.seq_len=$1 \
    --training.dtype=bfloat16 --training.device=cuda --training.compile=true --steps=10 --warmup=3 \
    --tokens=real --data.path=/tmp/packed --data.document_masking=true --data.reset_position_ids=true \
    --training.micro_batch_size=$2 --training.global_batch_size=$2 --json-out=$out > /tmp/bench.log 2>&1
  echo "bench s$1 mb$2 $3 rc=$? ($(( $(date +%s) - t0 )) s): $(python3 -c "
import json,sys; r=json.loads(open('$out').read().splitlines()[-1]); print(f\"{r['tokens_per_s_per_gpu']:,.0f} tokens/s, step {r['step_time_median_s']*1e3:.1f} ms, peak {r['peak_memory_gib']:.1f} GiB\")" 2>&1 | tail -1)"
}
for run in "2048 8 old" "2048 8 new" "2048 8 pinned" "8192 4 old" "8192 4 new" "8192 4 pinned" \
           "2048 8 old" "2048 8 new" "2048 8 pinned" "8192 4 old" "8192 4 new" "8192 4 pinned"; do
  [ $(( $(date +%s) - t0 )) -lt 330 ] || break
  bench $run
done
echo "total $(( $(date +%s) - t0 )) s"
