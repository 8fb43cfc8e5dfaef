# The session's first device call, carry .tt and data/fp8-corpus: on an H200 call A (the issue's targets,
# which are H200 figures), on any other card call B (the CUDA-graphs probe).
case "$(nvidia-smi --query-gpu=name --format=csv,noheader)" in
  *H200*) OUT=$OUT/callA BUDGET_S=400 bash bench/results/issue18-2026-12-07-s32/callA.sh ;;
  *) OUT=$OUT/callB BUDGET_S=400 bash bench/results/issue18-2026-12-07-s32/callB.sh ;;
esac
