# FLAWED (found in the nineteenth session): the tree copies on PYTHONPATH were never imported, because
# `python3 -m threefold` run from the repository root puts the current directory first on sys.path; every
# run used this tree. Its step comparisons between trees measure nothing; see ../issue18-2026-12-05-s19/callE.sh.
# Call B (eighteenth session), on call A's warm machine (carry .fa4b and data/fp8-corpus):
# 1. the FA4 GPU tests after the masked test's fix (it now writes its documents itself);
# 2. what FlexAttention's document block mask costs to build: torch's create_block_mask against the
#    mask from each tile's first and last document id (bench/flex_mask_build.py);
# 3. document-masked `threefold bench` (packed random documents, median 1,024) at seq 2048 micro-batch 8 and
#    seq 8192 micro-batch 4, each its own process, interleaved: FlexAttention with the mask built the old way
#    (the previous commit's attention.py, carried as old_attention.py), the new way, and FA4;
# 4. on an H200, the unmasked headline through `threefold train` at micro-batch 4 and 8 (auto, fa4);
#    otherwise the masked `threefold train` on real text, flex (new) against fa4.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
site=/tmp/fa4site
if [ ! -d $site/flash_attn ]; then
  [ -s /tmp/fa4parts/a ] || { echo "call A's part is not here: a fresh machine"; exit 3; }
  mkdir -p $site && cat /tmp/fa4parts/a .fa4b/part | xz -d | tar -C $site -xf - || exit 4
fi
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$gpu; unpacked ($(( $(date +%s) - t0 )) s)"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -k fa4 -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1
tail -n 2 $OUT/gpu_tests.txt; grep -E "^(FAILED|ERROR)|Error" $OUT/gpu_tests.txt | head -5; echo "($(( $(date +%s) - t0 )) s)"
PYTHONPATH=$PYTHONPATH:$PWD/bench timeout 120 python3 bench/flex_mask_build.py 2>&1 | grep -v Warning | tail -4
echo "($(( $(date +%s) - t0 )) s)"
rm -rf /tmp/old && mkdir -p /tmp/old && cp -r threefold /tmp/old/ && cp old_attention.py /tmp/old/threefold/model/attention.py
PYTHONPATH=$PYTHONPATH:$PWD/bench python3 -c "
from pathlib import Path; import document_masking as dm; dm.write_dataset(Path('/tmp/packed'))" || exit 5
bench() {  # seq, micro-batch, backend, tree (old / new)
  out=$OUT/bench-s$1-mb$2-$3-$4.jsonl
  tree=$PWD; [ $4 = old ] && tree=/tmp/old
  PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$tree timeout 150 python3 -m threefold bench \
    --model.preset=llama-1b --model.max_seq_len=$1 --data.seq_len=$1 \
    --training.dtype=bfloat16 --training.device=cuda --training.compile=true --steps=10 --warmup=3 \
    --tokens=real --data.path=/tmp/packed --data.document_masking=true --data.reset_position_ids=true \
    --training.micro_batch_size=$2 --training.global_batch_size=$2 --training.attention_backend=$3 \
    --json-out=$out > /tmp/bench-s$1-mb$2-$3-$4.log 2>&1
  echo "bench s$1 mb$2 $3 $4 rc=$? ($(( $(date +%s) - t0 )) s): $(python3 -c "
import json,sys; r=json.loads(open('$out').read().splitlines()[-1]); print(f\"{r['tokens_per_s_per_gpu']:,.0f} tokens/s, step {r['step_time_median_s']*1e3:.1f} ms, peak {r['peak_memory_gib']:.1f} GiB\")" 2>&1 | tail -1)"
}
train() {  # backend, micro-batch, masking
  dir=/tmp/train-$1-mb$2-mask$3-$(date +%s)
  timeout 120 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.micro_batch_size=$2 --training.global_batch_size=$2 \
    --data.document_masking=$3 --training.attention_backend=$1 --logging.out_dir=$dir > $dir.log 2>&1
  echo "train $1 mb$2 masking=$3 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" $dir.log)"; grep -m2 Error $dir.log
}
bench 2048 8 auto old; bench 2048 8 auto new; bench 2048 8 fa4 new
for run in "bench 8192 4 auto old" "bench 8192 4 auto new" "bench 8192 4 fa4 new"; do
  [ $(( $(date +%s) - t0 )) -lt 400 ] || break
  $run
done
case "$gpu" in
  *H200*) runs="train_auto_8_false train_fa4_8_false train_auto_4_false train_fa4_4_false" ;;
  *) runs="train_auto_8_true train_fa4_8_true" ;;
esac
for run in $runs; do
  [ $(( $(date +%s) - t0 )) -lt 460 ] || break
  $(echo $run | tr _ ' ')
done
echo "total $(( $(date +%s) - t0 )) s"
