#!/usr/bin/env bash
# TP communication overlapped with the weight-gradient GEMMs (parallel.overlap_tp_comm), off then on:
# llama-8b (seq 4096, bf16, compile) as tp2 on 2 GPUs (twice each, then with sequence parallelism), or as
# tp2 x pp2 interleaved and tp4 on 4 GPUs; then NCCL parity of the overlapped path (tiny, fp32, the same
# synthetic tokens as 1 GPU).
# Usage: bash bench/tp_overlap.sh OUT_DIR [GPUS: 2 or 4]
set -u
out=${1:-runs/tp_overlap}
gpus=${2:-4}
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
    --training.compile=true --steps 4 --warmup 2)
if [ "$gpus" = 4 ]; then
  t2p2=(--parallel.tp_size=2 --parallel.pp_size=2 --parallel.num_model_chunks=2
        --parallel.pipeline_schedule=interleaved --training.micro_batch_size=2 --training.global_batch_size=32)
  t4=(--parallel.tp_size=4 --training.micro_batch_size=1 --training.global_batch_size=8)
  for overlap in false true; do
    bench "l8-t2p2v2-b2-overlap-$overlap" 4 200 "${l8[@]}" "${t2p2[@]}" --parallel.overlap_tp_comm=$overlap
  done
  for overlap in false true; do
    bench "l8-t4-b1-overlap-$overlap" 4 150 "${l8[@]}" "${t4[@]}" --parallel.overlap_tp_comm=$overlap
  done
else
  t2=(--parallel.tp_size=2 --training.micro_batch_size=1 --training.global_batch_size=8)
  for run in 1 2; do  # alternated, so drift over the session does not favour either
    for overlap in false true; do
      bench "l8-t2-b1-overlap-$overlap-$run" 2 150 "${l8[@]}" "${t2[@]}" --parallel.overlap_tp_comm=$overlap
    done
  done
  bench "l8-t2-b1-sp" 2 150 "${l8[@]}" "${t2[@]}" --parallel.sequence_parallel=true
fi
tiny=(--model.preset=tiny --model.num_layers=4 --data.seq_len=128 --training.dtype=float32 --training.device=cuda
      --training.global_batch_size=16 --training.micro_batch_size=2 --optimizer.eps=1e-6 --optimizer.warmup_steps=2
      --optimizer.lr=3e-3 --steps 6 --warmup 0)
bench tiny-ref 1 90 "${tiny[@]}"
bench tiny-t2-sp 2 90 "${tiny[@]}" --parallel.tp_size=2 --parallel.sequence_parallel=true
bench tiny-t2 2 90 "${tiny[@]}" --parallel.tp_size=2
bench tiny-t2-compiled 2 120 "${tiny[@]}" --parallel.tp_size=2 --training.compile=true
if [ "$gpus" = 4 ]; then
  bench tiny-t2d2-sp 4 90 "${tiny[@]}" --parallel.tp_size=2 --parallel.dp_size=2 --parallel.sequence_parallel=true
  bench tiny-t4 4 90 "${tiny[@]}" --parallel.tp_size=4
fi
python3 bench/bench_table.py "$out/bench.jsonl"
