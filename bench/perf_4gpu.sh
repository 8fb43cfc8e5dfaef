#!/usr/bin/env bash
# Issue 4 on 4 H200s, one call: llama-8b (seq 4096) best layout and tp2 x pp2 interleaved with
# torch.compile; llama-1b weak DP scaling on 1, 2 and 4 GPUs; NCCL parity of ZeRO-1 on the tiny model.
# Usage: bash bench/perf_4gpu.sh OUT_DIR   (results: OUT_DIR/bench.jsonl, logs, a table at the end)
set -u
out=${1:-runs/perf4}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
start=$SECONDS
bench() {  # name, nproc, limit, overrides...
  local name=$1 nproc=$2 limit=$3; shift 3
  if (( SECONDS - start > ${BUDGET:-500} )); then echo "$name skipped (time budget)"; return; fi
  timeout -s ABRT -k 10 "$limit" python3 -m threefold bench --nproc "$nproc" --json-out "$out/bench.jsonl" \
    "$@" > "$out/$name.log" 2>&1 || { echo "$name FAILED"; grep -v Warning "$out/$name.log" | tail -8; }
  grep -E "^(tokens/s|MFU|peak memory|step time)" "$out/$name.log" | sed "s/^/$name: /"
}
l8=(--model.preset=llama-8b --data.seq_len=4096 --training.dtype=bfloat16 --training.device=cuda
    --training.compile=true --training.global_batch_size=16 --steps 8 --warmup 3)
bench l8-d4-zero-b2 4 150 "${l8[@]}" --parallel.dp_size=4 --parallel.zero=true --training.micro_batch_size=2
bench l8-t2p2v2 4 150 "${l8[@]}" --parallel.tp_size=2 --parallel.pp_size=2 --parallel.num_model_chunks=2 \
  --parallel.pipeline_schedule=interleaved --training.micro_batch_size=1
l1=(--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda
    --training.compile=true --training.micro_batch_size=4 --steps 15 --warmup 4)
bench l1-d1 1 100 "${l1[@]}" --training.global_batch_size=4
bench l1-d2 2 100 "${l1[@]}" --parallel.dp_size=2 --training.global_batch_size=8
bench l1-d4 4 100 "${l1[@]}" --parallel.dp_size=4 --training.global_batch_size=16
bench l1-d4-zero 4 100 "${l1[@]}" --parallel.dp_size=4 --parallel.zero=true --training.global_batch_size=16
echo "== NCCL parity: ZeRO-1 dp4 against one GPU (tiny, fp32, same synthetic batches)"
tiny=(--model.preset=tiny --model.num_layers=4 --data.seq_len=128 --training.dtype=float32 --training.device=cuda
      --training.global_batch_size=16 --training.micro_batch_size=2 --optimizer.eps=1e-6 --optimizer.warmup_steps=2
      --steps 6 --warmup 0)
bench tiny-ref 1 90 "${tiny[@]}"
bench tiny-d4-zero 4 90 "${tiny[@]}" --parallel.dp_size=4 --parallel.zero=true
python3 bench/bench_table.py "$out/bench.jsonl"
