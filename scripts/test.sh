#!/usr/bin/env bash
# The test command: sets up .venv and the build, then runs the unit tests, the numeric tests of every CPU kernel
# again on the AVX2 code paths, and the benchmarks at CI sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
MMDKERNELS_STRICT_BUILD=1 bash scripts/setup_env.sh  # a kernel that fails to compile fails the tests
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
if [ "$(uname -m)" = x86_64 ]; then
  # Our AVX2 library and torch's/MKL's AVX2 paths round differently from the default ones on the same machine: a
  # tolerance fitted to one CPU's rounding fails here. A separate inductor cache: one filled under the default
  # capability and reused under ATEN_CPU_CAPABILITY=avx2 crashes inductor's generated kernels.
  inductor_cache=$(mktemp -d)
  MMDKERNELS_CPU_CAPABILITY=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
    TORCHINDUCTOR_CACHE_DIR="$inductor_cache" .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_cpu_capability.py tests/test_mmd.py tests/test_mmd_ops.py tests/test_mmd_published.py \
    tests/test_dhsic_tile.py tests/test_rvq.py tests/test_rvq_module.py tests/test_linear.py tests/test_sampling.py \
    tests/test_attention.py tests/test_lm.py
  rm -rf "$inductor_cache"
fi
.venv/bin/python -m pytest benchmarks -q -p no:cacheprovider --benchmark-columns=min,mean,rounds --benchmark-sort=name
