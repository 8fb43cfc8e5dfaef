# Call 4 (not run yet). Float8 at llama-8b's width (hidden 4096, MLP 14336; 8 of its 32 layers so that it
# fits one H200), bf16 and rowwise at micro-batch 4, synthetic tokens: checks the planner's float8 model
# away from the width it was fitted at. Predicted (`threefold plan --model W8.toml --gpus 1 --gpu h200
# --global-batch 4 --micro-batch-size 4 --recompute none --no-zero`, W8.toml = llama-8b, num_layers 8, seq
# 2048, compile): bf16 37,097 tokens/s, rowwise 43,691 (1.18x), 50.1 GiB. The planner takes the float8
# GEMMs at 1.80x bf16's as measured at 2048 wide; wider GEMMs should get nearer 2x, so above 1.18x is the
# expected direction.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 300 python bench/fp8.py --model llama-8b --num-layers 8 --modes false,rowwise --micro-batches 4 \
  --budget 200 > $OUT/w8.txt 2>&1; grep -E "tok/s|FAILED|Error" $OUT/w8.txt
