# Call B (twenty-sixth session), carry .old (threefold/model/transformer.py as at c87ff07), .tt and
# data/fp8-corpus. On an H200, call A (the side by side). On any other card: compiled layers whose row
# reductions up to 8192 wide are persistent (compile_choices.WideRowReductions, new) against inductor's
# own limit of 1024 (old), one machine: the GPU tests of it, then bench/profile_step.py (llama-1b, seq
# 2048, micro-batch 8, compiled) rowwise + float8 output layer new / old / new / old, then bf16 new / old.
export PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/s26b}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
case "$(cat "$out/card.txt")" in *H200*) OUT=$out bash bench/results/issue18-2026-12-06-s26/callA.sh; exit ;; esac
old=/tmp/oldtree
rm -rf $old && mkdir -p $old && cp -r threefold bench $old/ && cp .old/transformer.py $old/threefold/model/
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -k "wide_rows or one_graph" \
  2>&1 | tail -3 | tee "$out/gpu-tests.txt"
args="--model.preset=llama-1b --data.seq_len=2048 --training.dtype=bfloat16 --training.device=cuda \
 --training.compile=true --training.micro_batch_size=8 --training.global_batch_size=8"
fp8="--training.fp8=rowwise --training.fp8_output_layer=true"
i=0
for run in "new $fp8" "old $fp8" "new $fp8" "old $fp8" "new" "old"; do
  set -- $run; tree=$1; shift; extra="$*"; mode=${extra:+rowwise}; mode=${mode:-bf16}
  [ $(( $(date +%s) - t0 )) -lt 500 ] || break
  i=$((i + 1)); dir=$PWD; [ $tree = old ] && dir=$old
  (cd $dir && PYTHONPATH=$dir python3 -c "import threefold.model.transformer as t; print(t.__file__, 'wide rows:', 'COMPILE_OPTIONS' in open(t.__file__).read())")
  (cd $dir && PYTHONPATH=$dir timeout 150 python3 bench/profile_step.py $args $extra --steps 4) \
    > "$out/profile_${i}_${tree}_$mode.txt" 2>&1
  echo "== $i $tree $mode rc $? ($(( $(date +%s) - t0 )) s)"
  grep -E "^step time|^peak" "$out/profile_${i}_${tree}_$mode.txt"
done
echo "total $(( $(date +%s) - t0 )) s"
