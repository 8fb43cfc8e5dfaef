# Unpacks FA4's packages (bench/fa4_pack.sh) on a GPU machine, to be sourced by a call script from the
# repository root: `. bench/fa4_unpack.sh PART_B SITE`. The first part lies in /tmp/fa4parts/a, copied
# there by an earlier call on the same warm machine (bench/results/issue18-2026-12-05-s18/callA.sh);
# PART_B is the second part, carried by this call. The packages go into SITE/site-packages (unpacked once a
# machine), which is put on PYTHONPATH with the CuTe DSL's own package folder and the repository. The folder
# must be named site-packages: QuACK fingerprints the code its epilogues call for its compile cache, and it
# leaves installed code (a path through site-packages or dist-packages) out; anywhere else it walks into the
# CuTe DSL's own functions and fails on a context variable there (thirty-eighth session, docs/benchmarks.md).
# Returns 3 on a fresh machine (no first part), 4 when the parts do not unpack.
fa4_part_b=$1
fa4_site=$2/site-packages
if [ ! -d "$fa4_site/flash_attn" ]; then
  [ -s /tmp/fa4parts/a ] || { echo "the first call's part is not in /tmp/fa4parts: a fresh machine"; return 3; }
  mkdir -p "$fa4_site" && cat /tmp/fa4parts/a "$fa4_part_b" | xz -d | tar -C "$fa4_site" -xf - || return 4
fi
export PYTHONPATH=$fa4_site:$fa4_site/nvidia_cutlass_dsl/dsl_packages:$PWD
