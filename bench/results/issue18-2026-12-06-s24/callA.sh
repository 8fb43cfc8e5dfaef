# Call A (twenty-fourth session): the float8 output layer with one scale per operand (loss.SCALING), any
# Hopper card. Carry data/fp8-corpus. The GPU float8 tests, then the loss guard's seed 1234 for rowwise +
# the output layer and bf16 on the same machine (tokens/s through `threefold train` from their metrics).
# Then, with SEEDS="1235 1236" and MODES=rowwise+output, the guard's other seeds (call B). The device
# returns no file with a + in its name: the runs' files are renamed rowwise_output-*.
out=${OUT:-/tmp/s24a}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
if [ -z "${SEEDS:-}" ]; then
  python3 -m pytest -q -m gpu tests/test_gpu_fp8.py 2>&1 | tail -6 | tee "$out/gpu-tests.txt"
fi
for seed in ${SEEDS:-1234}; do
  SEED=$seed MODES="${MODES:-rowwise+output false}" OUT=$out bash bench/fp8_loss.sh
done
for f in "$out"/*+output*; do [ -e "$f" ] && mv "$f" "${f/+output/_output}"; done
ls "$out"
