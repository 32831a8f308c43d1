#!/usr/bin/env bash
# The GPU check: on a CUDA machine, builds the extensions with the machine's own torch (the CUDA library and the one
# CPU library this machine's CPU runs), runs the GPU tests (CUDA and compiled Triton backends, CUDA graphs) and the
# GPU benchmarks, in one command of at most 10 minutes.
# Results go to $OUT if set (the device tool's output folder), else ./gpu_results: summary.txt (device, build, test
# and benchmark outcomes), build.log, tests.log, bench.log, bench_gpu.json, bench_linear_gpu.json; with
# GPU_CHECK_KEEP_LIBRARIES=1 also the built libraries, debug info stripped (to carry into a later call).
# Environment: GPU_CHECK_SECONDS (total budget, 570), GPU_CHECK_TESTS (test paths / node ids to run instead of the
# default set), GPU_CHECK_STAGES (the stages in order, default "tests bench linear"), GPU_CHECK_WORKERS (pytest-xdist
# workers, 14), GPU_CHECK_BUILD=0 (use libraries already in mmdkernels/, e.g. carried from an earlier call).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
summary=$out/summary.txt
python=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# one CPU library: the widest this CPU runs (the other is CI's to build; the GPU tests compare against the CPU kernels)
if grep -qw avx512bw /proc/cpuinfo; then variant=avx512; else variant=avx2; fi
export MMDKERNELS_CPU_VARIANTS=${MMDKERNELS_CPU_VARIANTS:-$variant}

SECONDS=0
budget=${GPU_CHECK_SECONDS:-570}
# every stage gets at most its own cap and what is left of the budget, so a slow stage shortens the later ones instead
# of the device tool killing the whole run
cap() { local left=$((budget - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 10 ? left : 10)) || echo "$1"; }
log() { echo "$*" | tee -a "$summary"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  grep -m1 "model name" /proc/cpuinfo; echo "cpus: $(nproc); CPU library built: $MMDKERNELS_CPU_VARIANTS"
  "$python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$summary"

if [ "${GPU_CHECK_BUILD:-1}" = 1 ]; then
  # the CPU and the CUDA library side by side (setuptools builds extensions one after the other, each from a few files)
  MMDKERNELS_SKIP_CUDA=1 timeout "$(cap 240)" "$python" setup.py build_ext --inplace > "$out/build.log" 2>&1 &
  cpu_build=$!
  MMDKERNELS_CPU_VARIANTS=none timeout "$(cap 240)" "$python" setup.py build_ext --inplace > "$out/build_cuda.log" 2>&1
  cuda_rc=$?
  log "CUDA build: rc $cuda_rc, ${SECONDS}s"
  wait "$cpu_build"
  log "CPU build: rc $?, ${SECONDS}s"
  cat "$out/build_cuda.log" >> "$out/build.log" && rm "$out/build_cuda.log"
  grep -E "warn|error|failed" "$out/build.log" | grep -v "^\s*$" | head -20 | tee -a "$summary"
fi
"$python" -c "import mmdkernels; from mmdkernels import _ext; print('cuda extension:', _ext.available('cuda'), _ext.load_error('cuda')); print('cpu:', mmdkernels.cpu_capability())" 2>&1 | tee -a "$summary"

if [ "${GPU_CHECK_KEEP_LIBRARIES:-0}" = 1 ]; then
  for lib in mmdkernels/_C_*.so; do strip --strip-debug -o "$out/$(basename "$lib")" "$lib" || cp "$lib" "$out/"; done
  ls -la "$out"/*.so | tee -a "$summary"
fi

# tests/test_compile.py is not in the default set: it compiles CPU ops only (CI runs it), and one of its tests took
# 98 s of a worker on the H200's host (session 18)
tests=${GPU_CHECK_TESTS:-"tests/test_mmd_gpu.py tests/test_rvq_gpu.py tests/test_sampling_gpu.py tests/test_linear_packed_gpu_paths.py tests/test_attention_gpu.py tests/test_generate.py::test_cuda_graph_step_equals_eager_step tests/test_reduced_cache.py::test_cuda_graph_step_over_a_bfloat16_cache"}
tests_rc=0
run_tests() {
  local workers=() start=$SECONDS
  "$python" -c "import xdist" 2>/dev/null && workers=(-n "${GPU_CHECK_WORKERS:-14}")
  # shellcheck disable=SC2086
  timeout "$(cap 270)" "$python" -m pytest $tests "${workers[@]}" --timeout=150 -q -rfE -p no:cacheprovider \
    --durations=15 > "$out/tests.log" 2>&1
  tests_rc=$?
  log "tests: rc $tests_rc, $((SECONDS - start))s"
  grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | tail -40 | tee -a "$summary"
}
run_bench() {
  local start=$SECONDS
  timeout "$(cap 170)" "$python" -m pytest benchmarks/bench_mmd_gpu.py benchmarks/bench_rvq_gpu.py \
    benchmarks/bench_sampling_gpu.py benchmarks/bench_decode_gpu.py benchmarks/bench_attention_gpu.py -q \
    -p no:cacheprovider --benchmark-json="$out/bench_gpu.json" --benchmark-columns=min,mean,rounds >> "$out/bench.log" 2>&1
  log "benchmarks: rc $?, $((SECONDS - start))s"
  grep -E "passed|failed|^(FAILED|ERROR)" "$out/bench.log" | tee -a "$summary"
}
# packed decode weights (bf16 / fp16 / int8): Triton and CUDA kernels vs fp32 F.linear, and a MusicGen-small step
run_linear() {
  local start=$SECONDS
  timeout "$(cap 60)" "$python" -m pytest benchmarks/bench_linear_gpu.py -q -p no:cacheprovider \
    --benchmark-json="$out/bench_linear_gpu.json" --benchmark-columns=min,mean,rounds >> "$out/bench.log" 2>&1
  log "linear benchmarks: rc $?, $((SECONDS - start))s"
  grep -E "passed|failed|^(FAILED|ERROR)" "$out/bench.log" | tail -3 | tee -a "$summary"
}
for stage in ${GPU_CHECK_STAGES:-tests bench linear}; do "run_$stage"; done
log "tests exit $tests_rc; total ${SECONDS}s"
exit "$tests_rc"
