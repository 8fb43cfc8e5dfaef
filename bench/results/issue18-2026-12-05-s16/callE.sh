# Call E (sixteenth session; carry data/fp8-corpus): why the token-id copy test failed in call D (pageable
# copies), and `threefold train` micro-batch 8 with the step's figures copied behind the step, token ids
# from page-locked memory (PIN_HOST_BATCHES) against pageable memory.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
t0=$(date +%s)
python3 - <<'PY'
import time, torch
dev = torch.device("cuda")
def host_ms(n, pin):
    ts = [torch.randint(0, 128256, (8, 2048)) for _ in range(n)]
    [t.pin_memory().to(dev, non_blocking=True) if pin else t.to(dev, non_blocking=True) for t in ts]
    torch.cuda.synchronize(); torch.cuda._sleep(2_000_000_000)
    s = time.perf_counter()
    [t.pin_memory().to(dev, non_blocking=True) if pin else t.to(dev, non_blocking=True) for t in ts]
    took = time.perf_counter() - s; torch.cuda.synchronize(); return took * 1e3
for n in (1, 2, 3, 4, 8):
    print(f"{n} copies of (8, 2048) int64: pageable {min(host_ms(n, False) for _ in range(2)):.1f} ms, "
          f"pinned {min(host_ms(n, True) for _ in range(2)):.1f} ms")
PY
timeout 60 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -k "without_the_host" 2>&1 | grep -E "assert|passed|failed" | head -5
mkdir -p /tmp/nopin && echo "import threefold.train as t; t.PIN_HOST_BATCHES = False" > /tmp/nopin/sitecustomize.py
for run in "pinned" "pageable"; do
  dir=/tmp/train8-$run-$(date +%s)
  extra=""; [ $run = pageable ] && extra=/tmp/nopin:
  PYTHONPATH=$extra$PYTHONPATH timeout 90 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --logging.out_dir=$dir > $dir.log 2>&1
  echo "train mb8 $run rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" $dir.log)"
  cp $dir/metrics.jsonl $OUT/$(basename $dir).jsonl
done
echo "total $(( $(date +%s) - t0 )) s"
