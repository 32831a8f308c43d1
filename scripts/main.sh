#!/usr/bin/env bash
# The main job on its embedded default: sets up .venv and the build, then runs models/experiment.py (music21 corpus
# -> codecs without/with the MMD loss, 3 paired seeds -> held-out MI -> delay, depth-head, flatten LMs -> audio, decode
# timing -> outputs/experiment/report.md). Arguments pass through, e.g. `bash scripts/main.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
.venv/bin/python -m models.experiment "$@"
