#!/usr/bin/env bash
# The GPU check: on a CUDA machine, builds the extensions with the machine's own torch, runs every test (the CUDA
# and compiled Triton backends included) and the GPU benchmarks, in one command of at most 10 minutes.
# Results (logs, benchmark JSON) go to $OUT if set (the device tool's output folder), else ./gpu_results.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
python=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
"$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
SECONDS=0
"$python" setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
echo "build: ${SECONDS}s"
# one device call may run 600 s: every stage gets at most its own cap and what is left of GPU_CHECK_SECONDS (570 by
# default), so a slow stage shortens the later ones instead of the device tool killing the whole run
budget=${GPU_CHECK_SECONDS:-570}
cap() { local left=$((budget - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 10 ? left : 10)) || echo "$1"; }
# the GPU-specific tests (CUDA and compiled Triton backends, CUDA graphs) and the op/model tests that run on CUDA
# tensors when one is present; the CPU-only suite (distributed gloo, codec training, data) is CI's job
timeout "$(cap 300)" "$python" -m pytest tests/test_*_gpu.py tests/test_linear_packed_gpu_paths.py tests/test_compile.py \
  tests/test_lm.py tests/test_generate.py \
  -q -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}
timeout "$(cap 240)" "$python" -m pytest benchmarks/bench_mmd_gpu.py benchmarks/bench_rvq_gpu.py benchmarks/bench_sampling_gpu.py benchmarks/bench_decode_gpu.py benchmarks/bench_attention_gpu.py -q -p no:cacheprovider --benchmark-json="$out/bench_gpu.json" \
  --benchmark-columns=min,mean,rounds 2>&1 | tee "$out/bench.log" | tail -40
# packed decode weights (bf16 / fp16 / int8): Triton and CUDA kernels vs fp32 F.linear, and a MusicGen-small step
timeout "$(cap 120)" "$python" -m pytest benchmarks/bench_linear_gpu.py -q -p no:cacheprovider \
  --benchmark-json="$out/bench_linear_gpu.json" --benchmark-columns=min,mean,rounds 2>&1 | tee "$out/bench_linear.log" \
  | tail -50
echo "tests exit $tests_rc; total ${SECONDS}s"
exit "$tests_rc"
