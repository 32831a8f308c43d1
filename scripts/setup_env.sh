#!/usr/bin/env bash
# Creates .venv with the pinned stack and builds mmdkernels in it (C++ CPU kernels always; CUDA kernels when nvcc
# and a CUDA build of torch are present, GPU or not). Safe to rerun: dependencies install once, the build is
# incremental. Usage: source-free, `bash scripts/setup_env.sh`; other scripts call it first.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.mmdkernels-requirements
if [ ! -f "$stamp" ] || ! cmp -s requirements.txt "$stamp"; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  cp requirements.txt "$stamp"
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v -E "^\s*$|DEPRECATION|setuptools|warnings.warn|_BetaConfiguration|cannot be found" || true
.venv/bin/python -c "import mmdkernels, mmdkernels._ext as e; e.cpu_extension() or print('WARNING:', e.load_error('cpu'))"
