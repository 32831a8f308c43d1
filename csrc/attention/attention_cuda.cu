// CUDA backend of KV-cached decode attention (spec: mmdkernels/attention/reference.py): split-K flash-decoding.
// Kernel 1: CTA (query row = b * H + h, split) owns a contiguous range of the sequence's valid keys. Each of its 4
// warps streams every 4th group of kKeysPerStep keys: a lane holds Dh / 32 (rounded up) features of the pre-scaled
// query and of its output accumulator in registers, reads the matching features of each key row (coalesced across the
// warp), and butterfly shuffles reduce the dot products, so every lane sees every score and keeps the same running
// softmax (attention_tile.h). The warps' partials merge through shared memory. With one split the CTA writes the
// normalised output; otherwise it writes a float32 partial and kernel 2 merges the splits of each row. Keys at or
// past the length are never loaded. Accumulation is float32 whatever the cache dtype.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "attention/attention_checks.h"
#include "attention/attention_tile.h"
#include "common/checks.h"

namespace mmdkernels {
namespace attention {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxDim = 256;         // 8 features per lane at most
constexpr int kKeysPerStep = 4;      // independent dot products in flight per warp
constexpr int64_t kMinSplitKeys = 256;  // shorter splits cost more in partial traffic than they gain
constexpr int64_t kCtasPerSm = 4;    // split until the grid has about this many CTAs per SM

template <typename T>
struct DecodeArgs {
  const T* q;
  const T* k;
  const T* v;
  const int64_t* lengths;
  T* out;               // [rows, dim]
  float* partial_acc;   // [rows, splits, dim], unnormalised (splits > 1 only)
  SoftmaxState* partial_states;  // [rows, splits]
  float scale;
  int heads, group, dim, splits;
  int64_t max_len;
  int64_t q_stride_b, q_stride_h, q_stride_d;
  int64_t k_stride_b, k_stride_h, k_stride_s, k_stride_d;
  int64_t v_stride_b, v_stride_h, v_stride_s, v_stride_d;
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T, int kPerLane>
__global__ void __launch_bounds__(kThreads) decode_attention_split_kernel(DecodeArgs<T> args) {
  __shared__ float warp_acc[kWarps][kMaxDim];
  __shared__ SoftmaxState warp_states[kWarps];
  const int row = blockIdx.x, split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = row / args.heads, h = row % args.heads, g = h / args.group;
  int64_t begin, end;
  split_range(valid_length(args.lengths[b], args.max_len), args.splits, split, &begin, &end);

  float q[kPerLane], acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    q[i] = d < args.dim ? static_cast<float>(args.q[b * args.q_stride_b + h * args.q_stride_h + d * args.q_stride_d]) *
                              args.scale
                        : 0.0f;
    acc[i] = 0.0f;
  }
  const T* k_head = args.k + b * args.k_stride_b + g * args.k_stride_h;
  const T* v_head = args.v + b * args.v_stride_b + g * args.v_stride_h;
  SoftmaxState state = empty_state();

  for (int64_t s0 = begin + warp * kKeysPerStep; s0 < end; s0 += kWarps * kKeysPerStep) {
    float scores[kKeysPerStep];
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      const int64_t s = s0 + u;
      float partial = 0.0f;
      if (s < end) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < args.dim) partial += q[i] * static_cast<float>(k_head[s * args.k_stride_s + d * args.k_stride_d]);
        }
      }
      scores[u] = partial;
    }
    float step_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      scores[u] = warp_sum(scores[u]);
      if (s0 + u < end) step_max = fmaxf(step_max, scores[u]);
    }
    const float factor = raise_max(state, step_max);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] *= factor;
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      const int64_t s = s0 + u;
      if (s >= end) break;
      const float weight = softmax_weight(state, scores[u]);
      state.sum += weight;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < args.dim) acc[i] += weight * static_cast<float>(v_head[s * args.v_stride_s + d * args.v_stride_d]);
      }
    }
  }

  // Merge the warps' partials (disjoint keys) in shared memory; thread d of the CTA owns feature d.
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < args.dim) warp_acc[warp][d] = acc[i];
  }
  if (lane == 0) warp_states[warp] = state;
  __syncthreads();
  SoftmaxState merged = empty_state();
  float factors[kWarps];
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    float factor_merged, factor_warp;
    merged = merge_states(merged, warp_states[w], &factor_merged, &factor_warp);
#pragma unroll
    for (int x = 0; x < w; ++x) factors[x] *= factor_merged;
    factors[w] = factor_warp;
  }
  for (int d = threadIdx.x; d < args.dim; d += kThreads) {
    float value = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) value += warp_acc[w][d] * factors[w];
    if (args.splits == 1) {
      args.out[static_cast<int64_t>(row) * args.dim + d] = static_cast<T>(value * inverse_sum(merged));
    } else {
      args.partial_acc[(static_cast<int64_t>(row) * args.splits + split) * args.dim + d] = value;
    }
  }
  if (args.splits > 1 && threadIdx.x == 0) {
    args.partial_states[static_cast<int64_t>(row) * args.splits + split] = merged;
  }
}

// One CTA per query row: merges the row's splits in order and normalises; thread d owns feature d.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_attention_combine_kernel(const float* partial_acc,
                                                                            const SoftmaxState* partial_states,
                                                                            T* out, int splits, int dim) {
  const int64_t row = blockIdx.x;
  for (int d = threadIdx.x; d < dim; d += kThreads) {
    SoftmaxState state = empty_state();
    float value = 0.0f;
    for (int split = 0; split < splits; ++split) {
      float factor_merged, factor_split;
      state = merge_states(state, partial_states[row * splits + split], &factor_merged, &factor_split);
      value = value * factor_merged + partial_acc[(row * splits + split) * dim + d] * factor_split;
    }
    out[row * dim + d] = static_cast<T>(value * inverse_sum(state));
  }
}

// Splits per query row, from the cache size rather than the lengths (reading those would wait for the GPU).
int choose_splits(int64_t rows, int64_t max_len, int sms) {
  const int64_t wanted = (kCtasPerSm * sms + rows - 1) / rows;
  const int64_t most = std::max<int64_t>(1, (max_len + kMinSplitKeys - 1) / kMinSplitKeys);
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, most)));
}

template <typename T, int kPerLane>
void launch(const DecodeArgs<T>& args, int64_t rows, cudaStream_t stream) {
  decode_attention_split_kernel<T, kPerLane>
      <<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>(args.splits)), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (args.splits > 1) {
    decode_attention_combine_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        args.partial_acc, args.partial_states, args.out, args.splits, args.dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& lengths) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got one on ", q.device());
  mmdkernels::attention::check_decode_attention_args(q, k_cache, v_cache, lengths);
  const int64_t dim = q.size(2);
  TORCH_CHECK(dim >= 1 && dim <= kMaxDim, "q must have head size Dh in [1, ", kMaxDim, "] for the CUDA kernel, got ",
              dim);
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths, double scale,
         at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), rows = batch * heads;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int splits = choose_splits(rows, k.size(2), sms);
  at::Tensor partial_acc, partial_states;
  if (splits > 1) {
    partial_acc = at::empty({rows, splits, dim}, q.options().dtype(at::kFloat));
    partial_states = at::empty({rows, splits, 2}, q.options().dtype(at::kFloat));  // SoftmaxState = 2 floats
  }
  DecodeArgs<T> args{q.data_ptr<T>(),
                     k.data_ptr<T>(),
                     v.data_ptr<T>(),
                     lengths.data_ptr<int64_t>(),
                     out.data_ptr<T>(),
                     splits > 1 ? partial_acc.data_ptr<float>() : nullptr,
                     splits > 1 ? reinterpret_cast<SoftmaxState*>(partial_states.data_ptr<float>()) : nullptr,
                     static_cast<float>(scale),
                     static_cast<int>(heads),
                     static_cast<int>(heads / k.size(1)),
                     static_cast<int>(dim),
                     splits,
                     k.size(2),
                     q.stride(0), q.stride(1), q.stride(2),
                     k.stride(0), k.stride(1), k.stride(2), k.stride(3),
                     v.stride(0), v.stride(1), v.stride(2), v.stride(3)};
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (dim <= 64) {
    launch<T, 2>(args, rows, stream);
  } else if (dim <= 128) {
    launch<T, 4>(args, rows, stream);
  } else {
    launch<T, 8>(args, rows, stream);
  }
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& lengths, double scale) {
  check_inputs(q, k_cache, v_cache, lengths);
  const c10::cuda::CUDAGuard device_guard(q.device());
  static_assert(sizeof(SoftmaxState) == 2 * sizeof(float), "partial states are stored as float pairs");
  const auto lengths_c = lengths.contiguous();
  auto out = at::empty(q.sizes(), q.options());
  const auto dtype = q.scalar_type();  // float32, bfloat16 or float16 (checked above)
  if (dtype == at::kFloat) {
    run<float>(q, k_cache, v_cache, lengths_c, scale, out);
  } else if (dtype == at::kBFloat16) {
    run<c10::BFloat16>(q, k_cache, v_cache, lengths_c, scale, out);
  } else {
    run<c10::Half>(q, k_cache, v_cache, lengths_c, scale, out);
  }
  return out;
}

}  // namespace
}  // namespace attention
}  // namespace mmdkernels

TORCH_LIBRARY_IMPL(mmdkernels, CUDA, m) { m.impl("decode_attention", &mmdkernels::attention::decode_attention_cuda); }
