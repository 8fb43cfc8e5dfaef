#!/usr/bin/env bash
# llama-1b (seq 2048, bf16, torch.compile) on one H100 with `threefold bench`: TorchTitan's batch (4, no
# accumulation), then larger micro-batches and global batches. Usage: bash bench/llama1b_final.sh OUT_DIR
set -u
out=${1:-runs/l1final}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
l1=(--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda
    --training.compile=true --steps 15 --warmup 4)
for spec in "4 4" "8 8" "8 16" "8 32"; do
  set -- $spec
  name=b$1-gbs$2
  timeout -s ABRT -k 10 150 python3 -m threefold bench "${l1[@]}" --training.micro_batch_size=$1 \
    --training.global_batch_size=$2 --json-out "$out/bench.jsonl" > "$out/$name.log" 2>&1 \
    || { echo "$name FAILED"; grep -v Warning "$out/$name.log" | tail -6; }
  grep -E "^(tokens/s|MFU|peak memory|step time)" "$out/$name.log" | sed "s/^/$name: /"
done
