# Call C (fortieth session; written, not run: no machine came): QuACK's linear cross-entropy against
# threefold's output layer and loss (bench/quack_loss.py), to decide whether a QuACK loss backend would pay.
# On the machine of call B (the packages stay unpacked), or after call A on a fresh one; carries .fa4b.
# Run as `bash <this> 2>&1 | tee $OUT/output.txt` from the repository root.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
. bench/fa4_unpack.sh .fa4b/part /tmp/fa4env || exit
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader
for tokens in 16384 8192; do
  timeout 240 python3 bench/quack_loss.py --tokens $tokens --rounds 5 2>&1 | grep -v "UserWarning\|generate_mlir"
  echo "tokens $tokens done ($(( $(date +%s) - t0 )) s)"
done
