#!/usr/bin/env bash
# llama-1b (seq 2048, bf16) on one H100: the code before this round of optimizations (runs/base, when
# present) against the current code, through `threefold train` on Shakespeare (same data, so the losses
# compare), then `threefold bench` variants and a kernel profile. Usage: bash bench/h100_llama1b.sh OUT
set -u
out=${1:-runs/h100}
mkdir -p "$out"
out=$(cd "$out" && pwd)
root=$(pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1
model=(--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda
       --training.compile=true --optimizer.warmup_steps=5)
train_args=(--data.path="$root/data/shakespeare" --training.eval_interval=0 --training.eval_batches=1
            --training.max_steps=30 --logging.log_interval=1 --logging.progress=false
            --logging.tensorboard=false --logging.plot=false)
train() {  # name, code directory (holding the threefold package), extra...
  local name=$1 code=$2; shift 2
  (cd "$code" && timeout -s ABRT -k 10 240 python3 -m threefold train "$root/bench/empty.toml" "${model[@]}" \
    "${train_args[@]}" --logging.out_dir="$out/$name" "$@" > "$out/$name.log" 2>&1) \
    || { echo "$name FAILED"; tail -20 "$out/$name.log"; }
}
bench() {  # name, extra...
  local name=$1; shift
  timeout -s ABRT -k 10 240 python3 -m threefold bench "${model[@]}" --json-out "$out/bench.jsonl" "$@" \
    > "$out/$name.log" 2>&1 || { echo "$name FAILED"; tail -20 "$out/$name.log"; }
  tail -9 "$out/$name.log"
}
b4=(--training.micro_batch_size=4 --training.global_batch_size=4)
if [ -d runs/base/threefold ]; then train base-b4 runs/base "${b4[@]}"; fi
train new-b4 . "${b4[@]}"
python3 bench/summarize.py "$out"/base-b4 "$out"/new-b4
python3 bench/compare_losses.py "$out"/base-b4 "$out"/new-b4
echo "== bench variants"
bench b4 "${b4[@]}"
bench b4-cudnn "${b4[@]}" --training.attention_backend=cudnn
bench b8 --training.micro_batch_size=8 --training.global_batch_size=8
bench b4-gbs16 --training.micro_batch_size=4 --training.global_batch_size=16
echo "== profile (b4)"
PYTHONPATH=. timeout -s ABRT -k 10 240 python3 bench/profile_step.py "${model[@]}" "${b4[@]}" > "$out/profile.txt" 2>&1 \
  || echo "profile FAILED"
head -60 "$out/profile.txt"
