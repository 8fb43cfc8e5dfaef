# Call D (thirty-seventh session): QuACK's MLP again, with the CuTe DSL 4.7.1 instead of 4.8.1, under which
# call C found QuACK 0.6.5's epilogue GEMMs failing to build. The packages: `CUTLASS=4.7.1 bash
# bench/fa4_pack.sh` run in a scratch folder, its parts copied to .q47a and .q47b (ignored by git). A first
# call carries .q47a and copies its part to /tmp (`mkdir -p /tmp/fa4parts && cp .q47a/part
# /tmp/fa4parts/a`); this one, on the same warm machine, carries .q47b. Then the GPU tests of the QuACK MLP
# and bench/quack_mlp.py at micro-batch 8's tokens.
# Run as `PYTHONPATH=$PWD bash <this> 2>&1 | tee $OUT/output.txt` from the device's repository root, on a
# checkout of the branch quack-mlp (where `training.mlp_backend` and its GPU tests are). Not run: the
# session's device time ran out; call E (beside this file) holds it and the runs planned after it.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
. bench/fa4_unpack.sh .q47b/part /tmp/q47site || exit
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader
python3 -c "import torch, quack, cutlass; print('torch', torch.__version__, 'quack', quack.__version__, 'cutlass', cutlass.__version__)"
echo "unpacked ($(( $(date +%s) - t0 )) s)"
timeout 75 python3 -m pytest -q -o addopts="" --tb=short -p no:logging -p no:cacheprovider -m gpu \
  tests/test_gpu.py -k quack 2>&1 | grep -vi warn | tail -12
echo "tests done ($(( $(date +%s) - t0 )) s)"
timeout 50 python3 bench/quack_mlp.py --tokens 16384
echo "total $(( $(date +%s) - t0 )) s"
