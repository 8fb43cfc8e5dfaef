#!/usr/bin/env bash
# FP8's loss guard (issue 18 item 2) through `threefold train` on real text: llama-1b, seq 2048, micro-batch
# 8, 500 steps, bf16 and then fp8 tensorwise, same data, seed and schedule (bench/fp8_loss.toml). Each run's
# metrics.jsonl comes back as $OUT/<mode>.jsonl; bench/fp8_loss_plot.py compares and plots them.
#
# The corpus (about 17.5M GPT-2 tokens, less than one epoch for 500 steps of 16,384 tokens) is Python source:
# the standard library, then transformers' and torch's .py files, one document per file, cut at 40 MB. It is
# prepared on the dev machine and carried (`carry: ["data/fp8-corpus"]`), since the GPU machine has no network:
#   python bench/fp8_loss_plot.py --make-corpus data/fp8-src/code.jsonl
#   threefold data prepare data/fp8-src/code.jsonl --out data/fp8-corpus
# Usage on one H200, from the repo root: bash bench/fp8_loss.sh [extra overrides]   (about 7 minutes)
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-runs/fp8-loss}"
mkdir -p "$out"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
# SEED=N (optional) runs both modes with training.seed N (other initial weights and data order) and
# names the files <mode>-seedN: a seed's pair of runs takes about 5.5 minutes, one device call each.
# MODES="..." (optional) picks the runs: e.g. MODES=rowwise SEED=1234 for the rowwise recipe alone. A mode
# ending in +output (e.g. rowwise+output) also puts the output layer's GEMMs in float8
# (training.fp8_output_layer = true).
seed="${SEED:-}"
for mode in ${MODES:-false tensorwise}; do
  name="$mode${seed:+-seed$seed}"
  run="/tmp/fp8-loss-$name"
  rm -rf "$run"
  start=$(date +%s)
  output=false; [ "${mode%+output}" != "$mode" ] && output=true
  timeout -s INT -k 10 280 python3 -m threefold train bench/fp8_loss.toml --training.fp8="${mode%+output}" \
    --training.fp8_output_layer=$output --logging.out_dir="$run" ${seed:+--training.seed=$seed} "$@" \
    > "$out/$name.log" 2>&1
  echo "fp8=$mode rc=$? $(( $(date +%s) - start )) s"; tail -n 3 "$out/$name.log"
  cp "$run/metrics.jsonl" "$out/$name.jsonl" 2>/dev/null || echo "no metrics.jsonl for $name"
done
