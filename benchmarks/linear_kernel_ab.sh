#!/usr/bin/env bash
# Builds and runs benchmarks/linear_kernel_ab.cpp (the few-row linear kernels without torch, old against new,
# interleaved) for one ISA: benchmarks/linear_kernel_ab.sh [avx512|avx2] [MODE THREADS ROUNDS TYPES MS FILTER]
# e.g. benchmarks/linear_kernel_ab.sh avx512 l3 1 11 f32,bf16,i8 1,2,4,8,16 amx,amxold
# MMDKERNELS_AB_OLD=<commit>: the commit of "old" (and of "amxold", where it has csrc/linear/linear_amx.h).
set -euo pipefail
cd "$(dirname "$0")/.."
isa=${1:-avx512}
shift || true
old_commit=${MMDKERNELS_AB_OLD:-ed472bb}
dir=$(mktemp -d)
[ -n "${MMDKERNELS_AB_KEEP:-}" ] || trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/old/linear"
git show "$old_commit:csrc/linear/linear_kernel.h" |
  sed 's/namespace mmdkernels::linear/namespace mmdkernels::old_linear/; s/linear::gelu/old_linear::gelu/;
       s#"linear/linear_vec.h"#"old_linear_vec.h"#' \
    > "$dir/old/linear/old_linear_kernel.h"
git show "$old_commit:csrc/linear/linear_vec.h" | sed 's/namespace mmdkernels::linear/namespace mmdkernels::old_linear/' \
  > "$dir/old/linear/old_linear_vec.h"
if git cat-file -e "$old_commit:csrc/linear/linear_amx.h" 2>/dev/null; then  # "amxold": the old commit's AMX tiles
  git show "$old_commit:csrc/linear/linear_amx.h" |
    sed 's/namespace mmdkernels::linear/namespace mmdkernels::old_linear/; s#"linear/linear_kernel.h"#"old_linear_kernel.h"#' \
      > "$dir/old/linear/old_linear_amx.h"
fi
# the old commit's bfloat16 tiles took int8 weights too until the AMX-INT8 tiles came (linear_amx_int8.h)
old_amx_int8=1
grep -qs '"float32 or bfloat16 weights"' "$dir/old/linear/old_linear_amx.h" && old_amx_int8=0
old_segments=0  # "segold": the old commit's segments blocking, where it has one
grep -qs 'rows_segments' "$dir/old/linear/old_linear_kernel.h" && old_segments=1
flags="-DOLD_AMX_INT8=$old_amx_int8 -DOLD_SEGMENTS=$old_segments -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c -mprefer-vector-width=512"
[ "$isa" = avx2 ] && flags="-DOLD_SEGMENTS=$old_segments -mavx2 -mfma -mf16c"
# shellcheck disable=SC2086
g++ -O3 -std=c++17 -fopenmp -fno-math-errno -Wall $flags -I csrc -I "$dir" benchmarks/linear_kernel_ab.cpp \
  -o "$dir/linear_kernel_ab"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$dir/linear_kernel_ab" "$@"
