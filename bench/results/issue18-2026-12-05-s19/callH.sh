# Call H (nineteenth session), for an H200 only, on call A's warm machine (`../issue18-2026-12-05-s18/callA.sh`,
# carry .fa4a; then this, carry .fa4b and data/fp8-corpus): the issue's headline through `threefold train` on
# real text, unmasked, llama-1b, seq 2048, bf16, compile, torch's attention (auto) against FA4, micro-batch 8
# and 4, each run its own process, interleaved, twice.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
site=/tmp/fa4site
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$gpu"
case "$gpu" in *H200*) ;; *) echo "not an H200: the headline is an H200 figure; stopping"; exit 7 ;; esac
if [ ! -d $site/flash_attn ]; then
  [ -s /tmp/fa4parts/a ] || { echo "call A's part is not here: a fresh machine"; exit 3; }
  mkdir -p $site && cat /tmp/fa4parts/a .fa4b/part | xz -d | tar -C $site -xf - || exit 4
fi
export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:$PWD
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader
python3 -c "import torch; print(torch.__version__)"
train() {  # backend, micro-batch
  dir=/tmp/train-$1-mb$2-$(date +%s)
  timeout 120 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 \
    --training.micro_batch_size=$2 --training.global_batch_size=$2 \
    --training.attention_backend=$1 --logging.out_dir=$dir > $dir.log 2>&1
  echo "train $1 mb$2 rc=$? ($(( $(date +%s) - t0 )) s): $(grep "^done" $dir.log)"; grep -m2 Error $dir.log
}
for run in "auto 8" "fa4 8" "auto 4" "fa4 4" "auto 8" "fa4 8" "auto 4" "fa4 4"; do
  [ $(( $(date +%s) - t0 )) -lt 470 ] || break
  train $run
done
echo "total $(( $(date +%s) - t0 )) s"
