#!/usr/bin/env bash
# TorchTitan v0.2.2 and threefold side by side on one GPU, each through its own trainer, interleaved, each
# its own process: llama-1b's shape, seq 2048, bf16, compile, no activation checkpointing, 70 steps on the
# same text through the same GPT-2 tokenizer. Prints TorchTitan's median tokens/s of its 5-step windows
# after step 10 and threefold's median of steps 11-70 (`threefold train bench/fp8_loss.toml`).
#
# Before (dev machine, from the repo root; .tt is ignored by git, carried to the GPU machine):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .tt/whl torchtitan==0.2.2 \
#     torchdata==0.11.0 datasets==5.0.0 tyro==1.0.17 tomli dill==0.4.1 multiprocess==0.70.19 \
#     docstring-parser shtab typeguard
#   python bench/torchtitan_llama1b.py assets .tt/assets      (needs data/fp8-corpus)
# Then on the GPU machine (carry .tt and data/fp8-corpus): bash bench/torchtitan_side_by_side.sh [BATCHES]
# BATCHES: the batch sizes, default "8 4"; the round is repeated while under ROUND_S seconds (environment,
# default 250; 1 runs one round).
# BACKENDS (environment): threefold's `training.attention_backend` for its runs, default "auto"; e.g.
# BACKENDS="auto fa4" runs threefold once with each after each TorchTitan run (fa4 needs FlashAttention-4's
# packages importable). An entry ATTENTION:MLP sets `training.mlp_backend` too, e.g. BACKENDS="fa4:quack fa4"
# runs FA4 with the QuACK MLP, then FA4 with the default MLP.
# TF_ARGS (environment): more `threefold train` arguments for its runs, e.g. --data.path=data/fp8-small (a
# smaller prepared corpus of the same text, where a call's carry has no room for data/fp8-corpus).
# Run on one H100 on 2026-12-05: bench/results/issue18-2026-12-05-s17/callC.sh (the same commands); on two
# H100s on 2026-12-06, the second with BACKENDS="auto fa4": bench/results/issue18-2026-12-06-s22/.
set -u
batches=${1:-"8 4"}
backends=${BACKENDS:-auto}
out=${OUT:-/tmp/side_by_side}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ttsite \
  .tt/whl/*.whl > "$out/pip.txt" 2>&1 || { tail "$out/pip.txt"; exit 3; }
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader
titan() {  # batch
  log=$out/titan$1-$(date +%s).log
  PYTHONPATH=/tmp/ttsite:$PWD timeout 170 torchrun --standalone --nproc_per_node=1 bench/torchtitan_llama1b.py \
    train --job.config_file bench/torchtitan_llama1b.toml --training.local_batch_size="$1" > "$log" 2>&1
  echo "TorchTitan batch $1 rc=$? ($(( $(date +%s) - t0 )) s): $(python3 - "$log" <<'PY'
import re, statistics, sys
text = open(sys.argv[1]).read()
rows = [(int(s), float(m), int(t.replace(",", ""))) for s, m, t in
        re.findall(r"step:\s*(\d+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+)", text)]
late = [t for s, _, t in rows if s > 10]
print(f"median {statistics.median(late):,.0f} tokens/s over {len(late)} windows, "
      f"reserved {max(m for _, m, _ in rows)} GiB" if late else "no windows after step 10")
PY
)"
}
ours() {  # micro-batch, attention backend[:mlp backend]
  attention=${2%%:*} mlp=auto
  [ "$attention" = "$2" ] || mlp=${2#*:}
  dir=/tmp/train$1-$attention-$mlp-$(date +%s)
  PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD timeout 120 python3 -m threefold train bench/fp8_loss.toml \
    --training.max_steps=70 --training.micro_batch_size="$1" --training.global_batch_size="$1" \
    --training.attention_backend="$attention" --training.mlp_backend="$mlp" --logging.out_dir="$dir" \
    ${TF_ARGS:-} > "$dir.log" 2>&1
  echo "threefold micro-batch $1 $2 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" "$dir.log")"
  grep -iE "error|Traceback" "$dir.log" | head -5
  cp "$dir.log" "$out/"; cp "$dir/metrics.jsonl" "$out/$(basename "$dir").jsonl"
}
while :; do
  for b in $batches; do
    titan "$b"
    for a in $backends; do ours "$b" "$a"; done
  done
  [ $(( $(date +%s) - t0 )) -lt "${ROUND_S:-250}" ] || break
done
echo "total $(( $(date +%s) - t0 )) s"
