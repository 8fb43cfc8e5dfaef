# Call 3 (commit b2f3ad0): (a) a mixed recipe in a copy of the tree made here: every linear tensorwise except
# the MLP's down projection, which is rowwise (its input, SwiGLU's output, is where outlier tokens would
# make one scale per tensor coarse); the loss guard's seeds 1234-1236, 500 steps each. (b) micro-batch 4
# through `threefold train` (bf16 and rowwise, 80 steps of the guard's text), with the time left.
export PYTHONUNBUFFERED=1
rm -rf /tmp/v && mkdir /tmp/v && cp -r threefold bench /tmp/v/ && ln -s "$PWD/data" /tmp/v/data
sed -i 's/^            fp8=tp.fp8,$/            fp8="rowwise" if tp.fp8 else None,/' /tmp/v/threefold/model/transformer.py
grep -n 'fp8="rowwise"' /tmp/v/threefold/model/transformer.py
(cd /tmp/v && export PYTHONPATH=/tmp/v && mkdir -p "$OUT/mixed" && \
  for seed in 1234 1235 1236; do OUT="$OUT/mixed" MODES=tensorwise SEED=$seed bash bench/fp8_loss.sh; done)
export PYTHONPATH=$PWD
mkdir -p "$OUT/mb4"
OUT="$OUT/mb4" MODES="false rowwise" bash bench/fp8_loss.sh --training.max_steps=80 \
  --training.micro_batch_size=4 --training.global_batch_size=4
rm -f "$OUT"/mb4/*.log
