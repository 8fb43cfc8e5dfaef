#!/usr/bin/env bash
# Two bounds, on GPUs 0 and 1: how idle the GPU is during a llama-1b step (what CUDA graphs could save at
# most), and what a pipeline boundary transfer of llama-8b costs (what overlapping p2p could save at most).
# Usage: bash bench/idle_and_p2p.sh OUT_DIR   (needs 2 GPUs)
set -u
out=${1:-runs/idle_p2p}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
for b in 4 8; do
  PYTHONPATH=. CUDA_VISIBLE_DEVICES=0 timeout -s ABRT -k 10 240 python3 bench/profile_step.py --model.preset=llama-1b \
    --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda --training.compile=true \
    --training.micro_batch_size=$b --training.global_batch_size=$((2 * b)) --steps 3 --warmup 5 \
    > "$out/profile-llama1b-b$b.log" 2>&1 || echo "profile b$b FAILED"
  grep -E "^(profiled|step time)" "$out/profile-llama1b-b$b.log" | sed "s/^/llama-1b b$b: /"
done
PYTHONPATH=. timeout -s ABRT -k 10 120 torchrun --standalone --nproc-per-node 2 bench/p2p_cost.py 2 4096 4096 2 \
  > "$out/p2p.log" 2>&1 || { echo "p2p FAILED"; tail -5 "$out/p2p.log"; }
grep "boundary" "$out/p2p.log"
