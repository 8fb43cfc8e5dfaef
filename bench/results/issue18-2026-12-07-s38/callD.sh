# Call D (thirty-eighth session), on the H100 that ran calls B and C, at once after C: five more `threefold
# train` runs at micro-batch 8, FA4 and torch's attention with and without the QuACK MLP, interleaved; the
# packages stay unpacked from call B. Carries data/fp8-small. Sent as one command line (this file records
# it): `bash bench/results/issue18-2026-12-07-s38/callD.sh`. Output: each run's metrics in callD/.
export PYTHONUNBUFFERED=1; . bench/fa4_unpack.sh .fa4b/part /tmp/fa4env || exit; for r in "fa4 auto" "fa4 quack" "auto quack" "fa4 auto" "fa4 quack"; do set -- $r; d=/tmp/r-$1-$2-$(date +%s); timeout 110 python3 -m threefold train bench/fp8_loss.toml --training.max_steps=70 --training.micro_batch_size=8 --training.global_batch_size=8 --data.path=data/fp8-small --training.attention_backend=$1 --training.mlp_backend=$2 --logging.out_dir=$d > $d.log 2>&1; echo "$(date +%T) attention $1 mlp $2 rc=$? $(grep ^done $d.log)"; cp $d/metrics.jsonl $OUT/$(basename $d).jsonl; done
