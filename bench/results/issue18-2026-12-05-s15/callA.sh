# Call A (fifteenth session): carries the first part of FlashAttention-4's packages (flash-attn-4 4.0.0b40
# and its needs, unpacked and xz-packed on the dev machine: larger than one call may carry), which stays on
# the warm machine for call B; checks what the image already has; a bf16 baseline at micro-batch 8.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
ls -la .fa4a
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv
python3 -m pip list 2>/dev/null | grep -i -E "^torch |cutlass|cuda-bindings|cuda-python|flash|quack|tvm|protobuf|typing.ext|einops"
python3 -c "import torch.nn.attention as a; print('torch FA impls:', getattr(a, 'list_flash_attention_impls', lambda: 'none')())"
timeout 200 python3 bench/fp8.py --modes false --micro-batches 8 --budget 100 > $OUT/base.txt 2>&1
grep -E "tok/s|FAILED|Error" $OUT/base.txt
echo "total $(( $(date +%s) - t0 )) s"
