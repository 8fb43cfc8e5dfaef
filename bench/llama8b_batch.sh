#!/usr/bin/env bash
# llama-8b (seq 4096, bf16, compile) on 4 H200s at a larger global batch: the best layout (dp4 ZeRO-1)
# and tp2 x pp2 interleaved, then NCCL parity of ZeRO-1 (tiny, fp32, same synthetic tokens as 1 GPU).
# Usage: bash bench/llama8b_batch.sh OUT_DIR
set -u
out=${1:-runs/l8batch}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
bench() {  # name, nproc, limit, overrides...
  local name=$1 nproc=$2 limit=$3; shift 3
  timeout -s ABRT -k 10 "$limit" python3 -m threefold bench --nproc "$nproc" --json-out "$out/bench.jsonl" \
    "$@" > "$out/$name.log" 2>&1 || { echo "$name FAILED"; grep -v Warning "$out/$name.log" | tail -8; }
  grep -E "^(tokens/s|MFU|peak memory|step time|losses)" "$out/$name.log" | sed "s/^/$name: /"
}
l8=(--model.preset=llama-8b --data.seq_len=4096 --training.dtype=bfloat16 --training.device=cuda
    --training.compile=true --steps 6 --warmup 2)
bench l8-d4-zero-b2-gbs32 4 170 "${l8[@]}" --parallel.dp_size=4 --parallel.zero=true \
  --training.micro_batch_size=2 --training.global_batch_size=32
bench l8-t2p2v2-gbs32 4 170 "${l8[@]}" --parallel.tp_size=2 --parallel.pp_size=2 --parallel.num_model_chunks=2 \
  --parallel.pipeline_schedule=interleaved --training.micro_batch_size=1 --training.global_batch_size=32
tiny=(--model.preset=tiny --model.num_layers=4 --data.seq_len=128 --training.dtype=float32 --training.device=cuda
      --training.global_batch_size=16 --training.micro_batch_size=2 --optimizer.eps=1e-6 --optimizer.warmup_steps=2
      --steps 6 --warmup 0)
bench tiny-ref 1 90 "${tiny[@]}"
bench tiny-d4-zero 4 90 "${tiny[@]}" --parallel.dp_size=4 --parallel.zero=true
bench tiny-t2p2-zero-sp 4 90 "${tiny[@]}" --parallel.tp_size=2 --parallel.dp_size=2 --parallel.zero=true \
  --parallel.sequence_parallel=true
python3 bench/bench_table.py "$out/bench.jsonl"
