# Call 3: the loss guard's rowwise runs, seeds 1234, 1235 and 1236 (bf16 and tensorwise of the same seeds: calls 1-2
# and the sixth session's call 4).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for seed in 1234 1235 1236; do MODES=rowwise SEED=$seed bash bench/fp8_loss.sh; done
