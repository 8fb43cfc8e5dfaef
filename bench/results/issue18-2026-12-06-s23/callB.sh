# Call B (twenty-third session): bf16 and rowwise (layers only) through the same 500-step loss-guard runs as
# call A's, same seed, on the same kind of card. Carry data/fp8-corpus.
out=${OUT:-/tmp/s23b}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader
SEED=1234 MODES="false rowwise" OUT=$out bash bench/fp8_loss.sh
