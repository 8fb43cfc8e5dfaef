# Call C (seventeenth session; carry .tt and data/fp8-corpus): TorchTitan v0.2.2 and threefold side by side
# on one machine, interleaved, each its own process: llama-1b shape, seq 2048, bf16, compile, no activation
# checkpointing, 70 steps on the same text (data/fp8-corpus's first documents, GPT-2 tokenizer for both).
# TorchTitan through bench/torchtitan_llama1b.py (its trainer, a "1B" flavour added; logs every 5 steps);
# threefold through `threefold train bench/fp8_loss.toml` (logs every step). .tt holds the wheels
# (torchtitan 0.2.2 and the packages the image lacks) and the assets written by
# `python bench/torchtitan_llama1b.py assets .tt/assets`.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ttsite \
  .tt/whl/*.whl > $OUT/pip.txt 2>&1 || { tail $OUT/pip.txt; exit 3; }
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm --format=csv -lms 500 > $OUT/power.csv 2>&1 &
smi=$!
titan() {  # batch
  log=$OUT/titan$1-$(date +%s).log
  PYTHONPATH=/tmp/ttsite:$PWD timeout 170 torchrun --standalone --nproc_per_node=1 bench/torchtitan_llama1b.py \
    train --job.config_file bench/torchtitan_llama1b.toml --training.local_batch_size=$1 > $log 2>&1
  rc=$?
  python3 - "$log" <<'PY'
import re, statistics, sys
text = open(sys.argv[1]).read()
rows = [(int(s), int(t.replace(",", "")), float(m)) for s, m, t in
        re.findall(r"step:\s*(\d+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+)", text)]
late = [t for s, t, _ in rows if s > 10]
print(f"windows {len(rows)}, median tps of windows after step 10: {statistics.median(late) if late else 'none':,}"
      f" (min {min(late, default=0):,}, max {max(late, default=0):,}), memory {max((m for *_, m in rows), default=0)} GiB")
PY
  echo "  titan b$1 rc=$rc ($(( $(date +%s) - t0 )) s)"; grep -m3 -E "Error|error:" $log
}
ours() {  # micro-batch
  dir=/tmp/train$1-$(date +%s)
  PYTHONPATH=$PWD timeout 120 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.micro_batch_size=$1 --training.global_batch_size=$1 --logging.out_dir=$dir > $dir.log 2>&1
  echo "threefold mb$1 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" $dir.log)"
  cp $dir/metrics.jsonl $OUT/$(basename $dir).jsonl
}
titan 8; ours 8; titan 4; ours 4
for run in "titan 8" "ours 8" "titan 4" "ours 4"; do
  [ $(( $(date +%s) - t0 )) -lt 430 ] || break
  $run
done
kill $smi
echo "total $(( $(date +%s) - t0 )) s"
