#!/usr/bin/env bash
# llama-1b (seq 2048, bf16) on one GPU through the real `threefold train` path, several variants.
# Usage (on the GPU machine, from the repo root, with data/shakespeare prepared or carried):
#   bash bench/llama1b_1gpu.sh OUT_DIR
set -u
out=${1:-runs/bench}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
common=(--model.preset=llama-1b --data.path=data/shakespeare --data.seq_len=2048 --training.dtype=bfloat16
        --training.device=cuda --training.eval_interval=0 --training.eval_batches=1 --training.max_steps=30
        --logging.log_interval=1 --logging.progress=false --logging.tensorboard=false --logging.plot=false
        --parallel.tp_size=1 --parallel.dp_size=1 --optimizer.warmup_steps=5)
run() {  # name, extra overrides...
  local name=$1; shift
  echo "=== $name: $*"
  python3 -m threefold train bench/empty.toml "${common[@]}" --logging.out_dir="$out/$name" "$@" \
    > "$out/$name.log" 2>&1 || { echo "$name failed:"; tail -20 "$out/$name.log"; }
}
run compile-b4 --training.compile=true --training.micro_batch_size=4 --training.global_batch_size=4
run eager-b4 --training.compile=false --training.micro_batch_size=4 --training.global_batch_size=4
run compile-b2 --training.compile=true --training.micro_batch_size=2 --training.global_batch_size=2
python3 bench/summarize.py "$out"/compile-b4 "$out"/eager-b4 "$out"/compile-b2
