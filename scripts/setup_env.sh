#!/usr/bin/env bash
# Creates .venv with the pinned stack and builds mmdkernels in it (C++ CPU kernels always, one library per x86 ISA;
# CUDA kernels when nvcc and a CUDA build of torch are present, GPU or not). Idempotent and quick on a rerun:
# dependencies install once per requirements.txt, the package is installed (editable) once per pyproject.toml, and the
# build is incremental (scripts/dev_build.sh: unchanged sources compile nothing). Other scripts call it first.
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

# audiocraft: the reference forward of tests/test_checkpoints.py. Without its dependencies (xformers, spacy, av, a
# pinned torch, ...): the test imports only its LM modules and stubs the rest; einops, its one dependency they
# call, comes with requirements.txt (vector-quantize-pytorch)
stamp=.venv/.mmdkernels-audiocraft
audiocraft="audiocraft==1.3.0"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$audiocraft" ]; then
  .venv/bin/python -m pip install -q --no-deps "$audiocraft"
  echo "$audiocraft" > "$stamp"
fi

# the editable install only links the package (no compiling); the extensions are built in place just below
stamp=.venv/.mmdkernels-editable
if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
  MMDKERNELS_NO_EXTENSIONS=1 .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e . > .venv/.pip-e.log 2>&1 ||
    { cat .venv/.pip-e.log; exit 1; }
  cp pyproject.toml "$stamp"
fi

bash scripts/dev_build.sh
.venv/bin/python -c "import mmdkernels, mmdkernels._ext as e; print('mmdkernels CPU kernels:', mmdkernels.cpu_capability()); e.cpu_extension() or print('WARNING:', e.load_error('cpu'))"
