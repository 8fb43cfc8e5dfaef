# Calls C and D (twenty-third session): the loss guard's other two seeds for the float8 output layer, bf16
# and rowwise + output layer, one seed a call: `SEED=1235 bash callC.sh`, then SEED=1236. Carry
# data/fp8-corpus. The device returns no file with a + in its name, so the runs' files are renamed
# rowwise_output-*.
out=${OUT:-/tmp/s23c}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader
SEED=${SEED:?SEED=N} MODES="false rowwise+output" OUT=$out bash bench/fp8_loss.sh
for f in "$out"/*+output*; do mv "$f" "${f/+output/_output}"; done
ls "$out"
