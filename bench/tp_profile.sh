#!/usr/bin/env bash
# Where a tp2 step of llama-8b's layers goes, with and without sequence parallelism and the TP overlap
# (8 of the 32 layers, seq 4096, bf16, compile, micro-batch 1, global batch 4), on 2 GPUs.
# Usage: bash bench/tp_profile.sh OUT_DIR
set -u
out=${1:-runs/tp_profile}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
for sp in false true; do
  for overlap in false true; do
    name=sp-$sp-overlap-$overlap
    PYTHONPATH=. timeout -s ABRT -k 10 150 torchrun --standalone --nproc-per-node 2 bench/profile_step.py \
      --model.preset=llama-8b --model.num_layers=8 --data.seq_len=4096 --training.dtype=bfloat16 \
      --training.device=cuda --training.compile=true --training.micro_batch_size=1 \
      --training.global_batch_size=4 --parallel.tp_size=2 --parallel.sequence_parallel=$sp \
      --parallel.overlap_tp_comm=$overlap --steps 3 --warmup 4 > "$out/$name.log" 2>&1 \
      || { echo "$name FAILED"; grep -v Warning "$out/$name.log" | tail -6; }
    echo "== $name"
    grep -A 24 "^profiled" "$out/$name.log" | cut -c1-150
  done
done
