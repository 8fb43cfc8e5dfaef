#!/usr/bin/env bash
# After a refactor that should not change speed: the GPU-only tests, then llama-1b (seq 2048, bf16,
# compile, micro-batch 4) timed by `threefold bench` on this tree and on an older tree, alternating, in
# one run on one GPU. Usage: bash bench/structure_check.sh OLD_TREE  (OLD_TREE: a directory holding an
# older checkout's threefold/ package, e.g. from `git archive ace3ee7 threefold | tar -x -C OLD_TREE`).
set -u
old=${1:?usage: bench/structure_check.sh OLD_TREE}
out=$(realpath -m "${OUT:-runs/structure_check}")
old=$(realpath "$old")
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=$out bash bench/gpu_tests.sh || echo "gpu tests FAILED"
args=(--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda
      --training.compile=true --training.micro_batch_size=4 --training.global_batch_size=4
      --steps 25 --warmup 5 --json-out "$out/bench.jsonl")
for round in 1 2; do
  for tree in new old; do
    dir=$PWD; [ "$tree" = old ] && dir=$old
    echo "=== round $round: $tree tree ($dir)"
    (cd "$dir" && PYTHONPATH="$dir" timeout -s ABRT -k 10 240 python3 -m threefold bench "${args[@]}") \
      > "$out/bench-$tree-$round.log" 2>&1 || { echo "$tree failed"; tail -20 "$out/bench-$tree-$round.log"; }
    grep -h "tokens/s" "$out/bench-$tree-$round.log" | tail -3
  done
done
python3 bench/bench_table.py "$out/bench.jsonl" 2>/dev/null || cat "$out/bench.jsonl"
