# Call C (twenty-fifth session), carry data/fp8-corpus and .old, on call B's machine if it is still warm:
# seed 1234's 500-step rowwise + output-layer run through `threefold train` (bench/fp8_loss.sh) with the
# new code and with the old (5a26751's loss.py and _loss_kernels.py), for tokens/s and the loss curve.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s25c}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
old=/tmp/oldtree
rm -rf $old && mkdir -p $old && cp -r threefold bench $old/ && cp .old/*.py $old/threefold/model/ \
  && ln -s "$PWD/data" $old/data
for tree in ${TREES:-new old}; do
  dir=$PWD; [ $tree = old ] && dir=$old
  (cd $dir && SEED=${SEED:-1234} MODES=rowwise+output OUT="$out/loss-$tree" bash bench/fp8_loss.sh)
done
for f in "$out"/*/*+output*; do [ -e "$f" ] && mv "$f" "${f/+output/_output}"; done
echo "total $(( $(date +%s) - t0 )) s"
