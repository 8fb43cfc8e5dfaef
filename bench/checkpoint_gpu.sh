#!/usr/bin/env bash
# Cost of checkpointing llama-1b (seq 2048, bf16, 1 GPU): synchronous vs asynchronous saves.
# Usage: bash bench/checkpoint_gpu.sh OUT_DIR    (needs data/shakespeare; writes ~18 GB per checkpoint)
set -u
out=${1:-runs/ckpt-bench}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
common=(--model.preset=llama-1b --data.path=data/shakespeare --data.seq_len=2048 --training.dtype=bfloat16
        --training.device=cuda --training.compile=true --training.micro_batch_size=4 --training.global_batch_size=4
        --training.max_steps=14 --training.eval_interval=0 --logging.log_interval=1 --logging.progress=false
        --logging.tensorboard=false --logging.plot=false --checkpoint.interval=6 --checkpoint.keep_last=1)
for mode in sync async; do
  rm -rf "$out/ckpt-$mode"
  async=$([ $mode = async ] && echo true || echo false)
  timeout -s ABRT -k 10 280 python3 -m threefold train bench/empty.toml "${common[@]}" \
    --logging.out_dir="$out/$mode" --checkpoint.dir="$out/ckpt-$mode" --checkpoint.asynchronous=$async \
    > "$out/$mode.log" 2>&1 || { echo "$mode FAILED"; tail -20 "$out/$mode.log"; }
  du -sh "$out/ckpt-$mode"/step_* 2>/dev/null | tail -1
  rm -rf "$out/ckpt-$mode"
done
python3 bench/checkpoint_summary.py "$out/sync" "$out/async"
