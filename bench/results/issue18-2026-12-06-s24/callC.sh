# Calls C and D (twenty-fourth session): the float8 output layer with rowwise's row and column scales, the
# gradient GEMMs through cuBLAS's one-scale kernel with the column scales applied after (commit in the
# README). Carry data/fp8-corpus. Call C: the GPU test of the output layer, then seed 1234's rowwise +
# output layer and bf16 runs on one machine. Call D: SEEDS="1235 1236" MODES=rowwise+output. Files with a
# + in their names are renamed rowwise_output-* (the device returns none with a +).
out=${OUT:-/tmp/s24c}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
if [ -z "${SEEDS:-}" ]; then
  python3 -m pytest -q -m gpu tests/test_gpu_fp8.py -k output_layer 2>&1 | tail -3 | tee "$out/gpu-tests.txt"
fi
for seed in ${SEEDS:-1234}; do
  SEED=$seed MODES="${MODES:-rowwise+output false}" OUT=$out bash bench/fp8_loss.sh
done
for f in "$out"/*+output*; do [ -e "$f" ] && mv "$f" "${f/+output/_output}"; done
ls "$out"
