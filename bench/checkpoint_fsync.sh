#!/usr/bin/env bash
# What durable saves cost: llama-1b (seq 2048, bf16, 1 GPU) synchronous checkpoints, this tree (files and
# directory fsynced before the rename that commits a step) against an older tree without fsync, run
# alternately on the same GPU and disk. Usage: bash bench/checkpoint_fsync.sh OLD_TREE [OUT_DIR]
# (needs data/shakespeare in this tree; writes ~17 GB per checkpoint, keeps one).
set -u
old=$(realpath "${1:?usage: bench/checkpoint_fsync.sh OLD_TREE [OUT_DIR]}")
out=$(realpath -m "${2:-${OUT:-runs/ckpt-fsync}}")
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
common=(--model.preset=llama-1b --data.path="$PWD/data/shakespeare" --data.seq_len=2048 --training.dtype=bfloat16
        --training.device=cuda --training.compile=true --training.micro_batch_size=4 --training.global_batch_size=4
        --training.max_steps=12 --training.eval_interval=0 --logging.log_interval=1 --logging.progress=false
        --logging.tensorboard=false --logging.plot=false --checkpoint.interval=6 --checkpoint.keep_last=1)
for tree in new old; do
  dir=$PWD; [ "$tree" = old ] && dir=$old
  ckpt="$out/ckpt-$tree"; rm -rf "$ckpt"
  (cd "$dir" && PYTHONPATH="$dir" timeout -s ABRT -k 10 280 python3 -m threefold train "$OLDPWD/bench/empty.toml" \
     "${common[@]}" --logging.out_dir="$out/$tree" --checkpoint.dir="$ckpt") > "$out/$tree.log" 2>&1 \
    || { echo "$tree FAILED"; tail -20 "$out/$tree.log"; }
  du -sh "$ckpt"/step_* 2>/dev/null | tail -1
  rm -rf "$ckpt"
done
python3 bench/checkpoint_summary.py "$out/new" "$out/old"
