#!/usr/bin/env bash
# On a 4-GPU machine: (1) NCCL parity of pipeline/tensor/data layouts on the tiny model in fp32,
# (2) llama-1b bf16 throughput for a few 4-GPU layouts. Usage: bash bench/gpu_layouts.sh OUT_DIR
set -u
out=${1:-runs/layouts}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# A hung run gets SIGABRT (whole process group) after its limit; faulthandler then prints every rank's stack.
export PYTHONFAULTHANDLER=1
quiet=(--logging.progress=false --logging.tensorboard=false --logging.plot=false --logging.log_interval=1
       --data.path=data/shakespeare --training.device=cuda)
tiny=(--model.preset=tiny --model.num_layers=8 --training.dtype=float32 --data.seq_len=128
      --training.global_batch_size=16 --training.micro_batch_size=2 --training.max_steps=10
      --training.eval_interval=5 --training.eval_batches=8 --optimizer.eps=1e-6)
run() {  # name, overrides...
  local name=$1; shift
  timeout -s ABRT -k 10 "${LIMIT:-90}" python3 -m threefold train bench/empty.toml "${quiet[@]}" --logging.out_dir="$out/$name" "$@" \
    > "$out/$name.log" 2>&1 || { echo "$name FAILED"; tail -15 "$out/$name.log"; }
}
echo "== parity (tiny, fp32, 10 steps)"
run ref "${tiny[@]}"
run t2p2-1f1b "${tiny[@]}" --parallel.tp_size=2 --parallel.pp_size=2
run p4v2-interleaved "${tiny[@]}" --parallel.pp_size=4 --parallel.num_model_chunks=2 --parallel.pipeline_schedule=interleaved
run t2d2-sp "${tiny[@]}" --parallel.tp_size=2 --parallel.dp_size=2 --parallel.sequence_parallel=true
run p2d2-gpipe "${tiny[@]}" --parallel.pp_size=2 --parallel.dp_size=2 --parallel.pipeline_schedule=gpipe
run t2p2v2-noscatter "${tiny[@]}" --parallel.tp_size=2 --parallel.pp_size=2 --parallel.num_model_chunks=2 \
    --parallel.pipeline_schedule=interleaved --parallel.scatter_gather=false --training.recompute=full
python3 bench/compare_losses.py "$out/ref" "$out"/t2p2-1f1b "$out"/p4v2-interleaved "$out"/t2d2-sp "$out"/p2d2-gpipe "$out"/t2p2v2-noscatter

echo "== llama-1b, seq 2048, bf16, 4 GPUs, 18 steps"
llama=(--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.max_steps=18
       --training.eval_interval=0 --training.eval_batches=4 --optimizer.warmup_steps=5)
export LIMIT=150
run l-d4 "${llama[@]}" --parallel.dp_size=4 --training.micro_batch_size=2 --training.global_batch_size=32
run l-t2d2 "${llama[@]}" --parallel.tp_size=2 --parallel.dp_size=2 --training.micro_batch_size=2 --training.global_batch_size=32
run l-p4v2 "${llama[@]}" --parallel.pp_size=4 --parallel.num_model_chunks=2 --parallel.pipeline_schedule=interleaved \
    --training.micro_batch_size=2 --training.global_batch_size=32
python3 bench/summarize.py "$out"/l-d4 "$out"/l-t2d2 "$out"/l-p4v2
