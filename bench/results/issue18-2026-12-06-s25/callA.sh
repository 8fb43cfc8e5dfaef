# Call A (twenty-fifth session), carry .fa4a: on an H200, first keeps FA4's first part in the machine's /tmp
# for the side by side (`../issue18-2026-12-06-s22/callD.sh` after the second part); on any card, then
# sweeps the float8 transposed cast's tile and warps (bench/transposed_cast_tiles.py, never run before).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
out=${OUT:-/tmp/callA}; mkdir -p "$out"
nvidia-smi --query-gpu=name,power.limit,driver_version --format=csv,noheader | tee "$out/card.txt"
case "$(nvidia-smi --query-gpu=name --format=csv,noheader)" in
  *H200*) mkdir -p /tmp/fa4parts && cp .fa4a/part /tmp/fa4parts/a && ls -la /tmp/fa4parts ;;
esac
timeout 200 python bench/transposed_cast_tiles.py > "$out/cast_tiles.txt" 2>&1; tail -n 25 "$out/cast_tiles.txt"
echo "total $(( $(date +%s) - t0 )) s"
