#!/usr/bin/env bash
# Planner validation (issue 6): llama-8b, seq 4096, bf16 on 4 H200s. Measures several layouts with
# `threefold bench` (plus the planner's own first choice), then compares them with the plan:
# rank correlation, first-choice gap, memory errors (bench/plan_compare.py). One call, under ~9 minutes.
#
#   bash bench/plan_llama8b.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else runs/plan-llama8b
#   DRY=1 bash bench/plan_llama8b.sh /tmp/x   # the same steps with the tiny model on 2 CPU ranks
#
# Knobs (environment): BATCH (global batch, default 16), STEPS (default 8), WARMUP (default 2),
# LIMIT (seconds per run, default 80), BUDGET (seconds after which remaining runs are skipped, default 470).
set -u
out=${1:-${OUT:-runs/plan-llama8b}}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONFAULTHANDLER=1  # a run killed with SIGABRT prints every rank's stack
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

if [ "${DRY:-0}" = 1 ]; then
  model=tiny seq=128 gpus=2 gpu=h100 batch=${BATCH:-8} steps=${STEPS:-3} warmup=${WARMUP:-1}
  common=(--model.preset=tiny --data.seq_len=$seq --training.dtype=bfloat16 --training.device=cpu)
  layouts=(
    "dp2|--parallel.dp_size=2 --training.micro_batch_size=1"
    "dp2-zero|--parallel.dp_size=2 --parallel.zero=true --training.micro_batch_size=2"
    "tp2|--parallel.tp_size=2 --training.micro_batch_size=1"
    "pp2-1f1b|--parallel.pp_size=2 --training.micro_batch_size=1"
    "pp2v2|--parallel.pp_size=2 --parallel.num_model_chunks=2 --parallel.pipeline_schedule=interleaved --training.micro_batch_size=1"
  )
else
  model=llama-8b seq=4096 gpus=4 gpu=h200 batch=${BATCH:-16} steps=${STEPS:-8} warmup=${WARMUP:-2}
  common=(--model.preset=llama-8b --data.seq_len=$seq --training.dtype=bfloat16 --training.device=cuda)
  layouts=(
    "d4-zero-b1|--parallel.dp_size=4 --parallel.zero=true --training.micro_batch_size=1"
    "d4-zero-b2|--parallel.dp_size=4 --parallel.zero=true --training.micro_batch_size=2"
    "t4|--parallel.tp_size=4 --training.micro_batch_size=1"
    "t2d2-zero|--parallel.tp_size=2 --parallel.dp_size=2 --parallel.zero=true --training.micro_batch_size=1"
    "t2p2-1f1b|--parallel.tp_size=2 --parallel.pp_size=2 --training.micro_batch_size=1"
    "t2p2v2|--parallel.tp_size=2 --parallel.pp_size=2 --parallel.num_model_chunks=2 --parallel.pipeline_schedule=interleaved --training.micro_batch_size=1"
    "p4v2|--parallel.pp_size=4 --parallel.num_model_chunks=2 --parallel.pipeline_schedule=interleaved --training.micro_batch_size=1"
  )
fi
common+=(--training.global_batch_size=$batch --training.eval_interval=0 --logging.progress=false
         --logging.tensorboard=false --logging.plot=false)

echo "== plan: $model seq $seq batch $batch on $gpus x $gpu"
$py -m threefold plan --model $model --gpus $gpus --gpus-per-node $gpus --gpu $gpu --global-batch $batch --seq $seq \
  | tee "$out/plan.txt"
$py -m threefold plan --model $model --gpus $gpus --gpus-per-node $gpus --gpu $gpu --global-batch $batch --seq $seq \
  --json --top 5 > "$out/plan.json"
# The planner's first choice is measured too: first, unless one of the layouts above is the same.
same=$($py bench/plan_compare.py --plan "$out/plan.json" --which-first "${layouts[@]}")
echo "planner's first choice: ${same/none/not in the list, added}"
if [ "$same" = none ]; then
  first=$($py -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))[0]['overrides']))" "$out/plan.json")
  layouts=("planner-first|$first" "${layouts[@]}")
fi

start=$SECONDS
: > "$out/bench.jsonl"
for entry in "${layouts[@]}"; do
  name=${entry%%|*}; args=${entry#*|}
  if (( SECONDS - start > ${BUDGET:-470} )); then
    echo "{\"name\": \"$name\", \"error\": \"skipped: time budget spent\"}" >> "$out/bench.jsonl"; continue
  fi
  echo "== $name: $args"
  # shellcheck disable=SC2086  # $args is a list of overrides
  timeout -s ABRT -k 10 "${LIMIT:-80}" $py -m threefold bench bench/empty.toml "${common[@]}" $args \
    --nproc $gpus --steps $steps --warmup $warmup > "$out/$name.log" 2>&1
  rc=$?
  line=$(grep '^{' "$out/$name.log" | tail -1)
  if [ $rc -eq 0 ] && [ -n "$line" ]; then
    echo "$line" | $py -c "import json,sys; r=json.loads(sys.stdin.read()); r['name']='$name'; print(json.dumps(r))" \
      >> "$out/bench.jsonl"
    echo "$line" | cut -c1-200
  else
    echo "$name FAILED (exit $rc)"; tail -5 "$out/$name.log"
    echo "{\"name\": \"$name\", \"error\": \"exit $rc\"}" >> "$out/bench.jsonl"
  fi
done

echo "== measured vs planned"
$py bench/plan_compare.py "$out/bench.jsonl" --plan "$out/plan.json" --gpu $gpu --gpus-per-node $gpus --model $model \
  | tee "$out/compare.md"
