// Few-row linear layer on CUDA with packed weights: y [M, N] = act(scale * (x [M, D] @ weight [N, D]^T) + bias) for
// the M <= 16 float32 rows of a decode step, weights stored as bfloat16, float16 or int8 (+ a float32 scale per output
// channel); spec: decode_linear_ref on the QuantizedLinearWeight (mmdkernels/linear/reference.py).
// A memory-bound GEMV: one warp per output column streams that weight row once, 16 bytes per lane per load (8
// bfloat16 / float16 or 16 int8 weights, widened to float32 in registers), against the rows of x read through the
// read-only cache (x is small and shared by every warp); each lane keeps one float32 accumulator per row of x, summed
// across the warp by shuffles at the end, then the epilogue (int8 scale once per output, bias, exact-erf GELU).
// Rows whose length or base is not 16-byte aligned take a scalar loop. Not yet run on a GPU: the dispatcher asks for it
// only when told to (mmdkernels/_dispatch.py) until benchmarks/gpu_check.sh has tested and timed it.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>

#include "common/checks.h"
#include "linear/linear_checks.h"

namespace mmdkernels {
namespace linear {
namespace {

constexpr int kWarps = 8;  // output columns per block
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = 16;

// Each stored type: its storage, how many fit in 16 bytes, and how they widen to float32 (exactly).
struct BFloat16Weights {
  using Storage = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float widen(Storage w) { return __uint_as_float(static_cast<uint32_t>(w) << 16); }
  __device__ static void widen_vector(const uint4& v, float* out) {
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // little-endian: the lower half of a word is the earlier weight
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
};

struct HalfWeights {
  using Storage = __half;
  static constexpr int kVec = 8;
  __device__ static float widen(Storage w) { return __half2float(w); }
  __device__ static void widen_vector(const uint4& v, float* out) {
    const __half2* pairs = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};

struct Int8Weights {
  using Storage = int8_t;
  static constexpr int kVec = 16;
  __device__ static float widen(Storage w) { return static_cast<float>(w); }
  __device__ static void widen_vector(const uint4& v, float* out) {
    const int8_t* bytes = reinterpret_cast<const int8_t*>(&v);
#pragma unroll
    for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(bytes[i]);
  }
};

struct LinearArgs {
  const float* x;       // [rows, dim], row stride ldx
  const void* weight;   // [out_features, dim] contiguous
  const float* scale;   // [out_features] or nullptr
  const float* bias;    // [out_features] or nullptr
  float* y;             // [rows, out_features]
  int rows;
  int64_t out_features;
  int64_t dim;
  int64_t ldx;
  bool vectorized;      // 16-byte loads: dim a multiple of the vector, weight, x and ldx aligned
  bool gelu;
};

template <typename W>
__global__ void __launch_bounds__(kThreads) linear_kernel(LinearArgs args) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= args.out_features) return;  // the whole warp: n is the warp's
  const auto* w = static_cast<const typename W::Storage*>(args.weight) + n * args.dim;
  const int rows = args.rows;
  float acc[kMaxRows];
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) acc[m] = 0.0f;

  int64_t scalar_begin = 0;
  if (args.vectorized) {
    const int64_t vectors = args.dim / W::kVec;
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    for (int64_t v = lane; v < vectors; v += 32) {
      float wf[W::kVec];
      W::widen_vector(__ldg(wv + v), wf);
#pragma unroll
      for (int m = 0; m < kMaxRows; ++m) {
        if (m < rows) {
          const float4* xv = reinterpret_cast<const float4*>(args.x + m * args.ldx + v * W::kVec);
#pragma unroll
          for (int j = 0; j < W::kVec / 4; ++j) {
            const float4 xs = __ldg(xv + j);
            acc[m] += xs.x * wf[4 * j] + xs.y * wf[4 * j + 1] + xs.z * wf[4 * j + 2] + xs.w * wf[4 * j + 3];
          }
        }
      }
    }
    scalar_begin = vectors * W::kVec;
  }
  for (int64_t k = scalar_begin + lane; k < args.dim; k += 32) {
    const float wk = W::widen(w[k]);
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m)
      if (m < rows) acc[m] += __ldg(args.x + m * args.ldx + k) * wk;
  }

#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    if (m < rows) {  // rows is the same for the whole warp: every lane takes part in the shuffles
      float total = acc[m];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
      if (lane == m) {
        if (args.scale != nullptr) total *= args.scale[n];
        if (args.bias != nullptr) total += args.bias[n];
        if (args.gelu) total = 0.5f * total * (1.0f + erff(total * 0.70710678118654752f));
        args.y[m * args.out_features + n] = total;
      }
    }
  }
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

template <typename W>
void launch(LinearArgs args) {
  args.vectorized = args.dim % W::kVec == 0 && args.ldx % 4 == 0 && aligned16(args.weight) && aligned16(args.x);
  const int64_t blocks = (args.out_features + kWarps - 1) / kWarps;
  linear_kernel<W><<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor small_batch_linear_quantized_cuda(const at::Tensor& x, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& scale,
                                             const std::optional<at::Tensor>& bias, bool gelu) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  check_rows_and_bias(x, weight, bias, kMaxRows);
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kChar,
              "weight must have dtype BFloat16, Half or Char (int8), got ", dtype);
  check_scale(x, weight, scale);
  const int64_t out_features = weight.size(0);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0 || out_features == 0) return y;
  LinearArgs args{x.data_ptr<float>(),
                  weight.data_ptr(),
                  scale.has_value() ? scale->data_ptr<float>() : nullptr,
                  bias.has_value() ? bias->data_ptr<float>() : nullptr,
                  y.data_ptr<float>(),
                  static_cast<int>(x.size(0)),
                  out_features,
                  x.size(1),
                  x.stride(0),
                  false,
                  gelu};
  if (dtype == at::kBFloat16) {
    launch<BFloat16Weights>(args);
  } else if (dtype == at::kHalf) {
    launch<HalfWeights>(args);
  } else {
    launch<Int8Weights>(args);
  }
  return y;
}

}  // namespace
}  // namespace linear
}  // namespace mmdkernels

TORCH_LIBRARY_IMPL(mmdkernels, CUDA, m) {
  m.impl("small_batch_linear_quantized", &mmdkernels::linear::small_batch_linear_quantized_cuda);
}
