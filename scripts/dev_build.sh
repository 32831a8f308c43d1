#!/usr/bin/env bash
# Developer rebuild of the extensions into ./mmdkernels: incremental, one build at a time (a lock), and each .so
# replaced atomically so that test processes already running keep their loaded copy intact.
#   MMDKERNELS_SKIP_CUDA=1 bash scripts/dev_build.sh     # C++ CPU only (fast)
#   MMDKERNELS_STRICT_BUILD=1 bash scripts/dev_build.sh  # fail on any compile error (CUDA included)
set -euo pipefail
cd "$(dirname "$0")/.."
exec 9> /tmp/mmdkernels-build.lock
flock 9
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}
lib=build/dev-lib
.venv/bin/python setup.py -q build_ext --build-lib "$lib"
for so in "$lib"/mmdkernels/*.so; do
  name=$(basename "$so")
  cp "$so" "mmdkernels/.$name.tmp"
  mv -f "mmdkernels/.$name.tmp" "mmdkernels/$name"
done
echo "built: $(ls "$lib"/mmdkernels/*.so | xargs -n1 basename | tr '\n' ' ')"
