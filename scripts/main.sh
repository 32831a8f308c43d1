#!/usr/bin/env bash
# The main job on its embedded default: sets up .venv and the build, then runs the MMD demo report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m mmdkernels.demo "$@"
