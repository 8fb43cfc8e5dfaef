# Call A (eighteenth session): carries the first part of FlashAttention-4's packages (`.fa4a`) and keeps
# it in the machine's /tmp for call B.
mkdir -p /tmp/fa4parts && cp .fa4a/part /tmp/fa4parts/a && ls -la /tmp/fa4parts
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader
