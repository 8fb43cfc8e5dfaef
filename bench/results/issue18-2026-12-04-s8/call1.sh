# Call 1: the loss guard's tensorwise runs with dy in e4m3 (fp8.GRAD_DTYPE["tensorwise"] = E4M3, a copy of
# the tree made here), seeds 1234, 1235, 1236; bf16, tensorwise (e5m2) and rowwise of the same seeds are the
# seventh session's (../issue18-2026-12-04-s7/loss).
export PYTHONUNBUFFERED=1
rm -rf /tmp/v && mkdir /tmp/v && cp -r threefold bench /tmp/v/ && ln -s "$PWD/data" /tmp/v/data
sed -i 's/GRAD_DTYPE = {"tensorwise": E5M2/GRAD_DTYPE = {"tensorwise": E4M3/' /tmp/v/threefold/parallel/fp8.py
grep -n '^GRAD_DTYPE' /tmp/v/threefold/parallel/fp8.py
cd /tmp/v && export PYTHONPATH=/tmp/v
for seed in 1234 1235 1236; do MODES=tensorwise SEED=$seed bash bench/fp8_loss.sh; done
