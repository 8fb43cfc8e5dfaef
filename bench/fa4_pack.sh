#!/usr/bin/env bash
# Packs FlashAttention-4 (flash-attn-4 4.0.0b40, what `pip install -e ".[fa4]"` pins) and the packages it
# needs for a GPU machine that cannot reach PyPI: wheels for CPython 3.12 on x86-64 Linux, unpacked into one
# folder, C++ sources and the CuTe DSL's aarch64 stubs dropped, tar | xz -9 (about 72 MB), split in two parts
# because one device call carries at most 64 MiB with the tracked tree. Run on the dev machine from the repo
# root (both folders are ignored by git):
#   bash bench/fa4_pack.sh [FIRST_BYTES]        -> .fa4a/part (FIRST_BYTES, default 46,000,000) and .fa4b/part
# On the GPU machine a first call carries .fa4a and copies its part to /tmp
# (bench/results/issue18-2026-12-05-s18/callA.sh); a second call on the same warm machine carries .fa4b and
# unpacks both into a folder put on PYTHONPATH with its nvidia_cutlass_dsl/dsl_packages
# (bench/results/issue18-2026-12-07-s36/callB.sh; later call scripts source bench/fa4_unpack.sh for this).
set -euo pipefail
first=${1:-46000000}
# CUTLASS (environment): the CuTe DSL's release, default 4.8.1 (the one the earlier packs carried, and what
# pip picks for flash-attn-4 today). The thirty-seventh session blamed 4.8.1 for QuACK's failure to build its
# epilogues; the thirty-eighth found the cause in where the packages were unpacked (bench/fa4_unpack.sh).
cutlass=${CUTLASS:-4.8.1}
core=""
[ "${cutlass%.*}" = 4.8 ] && core="nvidia-cutlass-dsl-libs-core==$cutlass"  # 4.8 split this part out
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$work/whl" \
  flash-attn-4==4.0.0b40 nvidia-cutlass-dsl=="$cutlass" nvidia-cutlass-dsl-libs-base=="$cutlass" \
  nvidia-cutlass-dsl-libs-cu13=="$cutlass" $core apache-tvm-ffi torch-c-dlpack-ext \
  quack-kernels==0.6.5 einops==0.8.1 cuda-bindings==13.0.3 cuda-pathfinder protobuf
mkdir "$work/site"
for wheel in "$work"/whl/*.whl; do python3 -m zipfile -e "$wheel" "$work/site/"; done
find "$work/site" \( -name "*.cpp" -o -name "*.pyx" -o -name "*.pxd" \) -delete
find "$work/site" -path "*/stubs/aarch64-*" -prune -exec rm -rf {} +
tar -C "$work/site" -cf - . | xz -9 -T2 > "$work/fa4.tar.xz"
mkdir -p .fa4a .fa4b
head -c "$first" "$work/fa4.tar.xz" > .fa4a/part
tail -c +"$((first + 1))" "$work/fa4.tar.xz" > .fa4b/part
cat .fa4a/part .fa4b/part | cmp - "$work/fa4.tar.xz"
ls -l .fa4a/part .fa4b/part
