#!/usr/bin/env bash
# Measure this machine for the planner (GEMM curve, HBM bandwidth, causal attention, and with several GPUs
# the all-reduce and p2p bandwidth) and print it next to the built-in preset the planner would use.
# Usage (from the repo root, on the GPU machine): bash bench/plan_calibrate.sh "$OUT/calib"   (~1 minute)
set -euo pipefail
out=${1:-runs/calibrate}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=${PYTHONPATH:-.}
python3 -m threefold plan --calibrate --out "$out/measured.json" > "$out/calibrate.log" 2>&1 || {
    cat "$out/calibrate.log"; exit 1; }
python3 - "$out/measured.json" <<'PY'
import json, sys
import torch
from threefold.plan.hardware import preset_for_device
measured = json.load(open(sys.argv[1]))
preset = preset_for_device(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
base = preset.to_dict() if preset else {}
print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, torch {torch.__version__}")
print(f"{'field':<22} {'preset':>14} {'measured':>14}")
for key in ("peak_tflops", "hbm_gbps", "attention_efficiency", "intra_node_gbps", "p2p_intra_gbps"):
    print(f"{key:<22} {base.get(key, float('nan')):>14.3f} {measured[key]:>14.3f}")
print("gemm_curve (GFLOP, fraction of peak), measured:", measured["gemm_curve"])
print("gemm_curve, preset:", base.get("gemm_curve"))
PY
