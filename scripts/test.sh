#!/usr/bin/env bash
# The test command: sets up .venv and the build, then runs the unit tests and the benchmarks at CI sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
MMDKERNELS_STRICT_BUILD=1 bash scripts/setup_env.sh  # a kernel that fails to compile fails the tests
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
.venv/bin/python -m pytest benchmarks -q -p no:cacheprovider --benchmark-columns=min,mean,rounds --benchmark-sort=name
