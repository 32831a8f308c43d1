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
# up-to-date extensions are skipped and changed ones rebuilt by ninja object by object (setup.py), so a rerun on
# unchanged sources takes seconds
log=$(mktemp)
status=0
.venv/bin/python setup.py -q build_ext --build-lib "$lib" > "$log" 2>&1 || status=$?
grep -v -E "^\[[0-9]+/[0-9]+\] |^\s*$|[Dd]eprecat|setuptools|!!|\*\*\*\*|^\s+(See|Please|By|Unless|Requirements)" "$log" || true
rm -f "$log"
[ "$status" = 0 ] || exit "$status"
wanted=$(MMDKERNELS_PRINT_EXTENSIONS=1 .venv/bin/python setup.py 2>/dev/null)
installed=""
for module in $wanted; do
  for so in "$lib"/mmdkernels/"$module".*.so; do
    [ -f "$so" ] || continue
    name=$(basename "$so")
    if ! cmp -s "$so" "mmdkernels/$name"; then
      cp "$so" "mmdkernels/.$name.tmp"
      mv -f "mmdkernels/.$name.tmp" "mmdkernels/$name"
    fi
    installed="$installed $name"
  done
done
# libraries of another configuration (another variant set, an old single _C) would shadow or confuse the loader
for so in mmdkernels/_C*.so; do
  [ -f "$so" ] || continue
  case "$(basename "$so")" in _C_cuda.*) continue ;; esac
  case " $installed " in *" $(basename "$so") "*) ;; *) rm -f "$so" ;; esac
done
echo "built:$installed"
