// CUDA backend of the fused sampler (contract: docs/sampling_kernels.md): one 256-thread block per (b, k) row, the
// row re-read from global memory (L1/L2-resident) on every pass, nothing sorted. Pass 1 finds the maximum and
// checks the row; top-k and top-p each find their boundary token by a bitwise descent on the 64-bit rank key
// (sampling_tile.h), one pass per bit that block-sums a count or the float64 mass exp(z - max) of the tokens ranked
// at or above a candidate key (the Triton kernel does the same, two bits per pass). The draw gives each thread a
// contiguous segment: segment masses, a block exclusive scan, then each thread rescans its segment for the first
// crossing.
// Reductions have a fixed shape, so results are deterministic. Mixing/scaling are float32 as in the spec; exp is
// evaluated in double and rounded to float (--use_fast_math would otherwise make it __expf).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "common/checks.h"
#include "sampling/sampling_checks.h"
#include "sampling/sampling_tile.h"

namespace mmdkernels {
namespace sampling {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kOrderKeyBits = 32;

struct SampleArgs {
  const void* logits;       // [N, K, V]
  const double* uniforms;   // [B, K]
  int64_t* tokens;          // [B, K]
  int64_t num_tokens;       // V
  int64_t uncond_offset;    // B * K * V: where the unconditional rows start
  int index_bits;           // bits of V - 1 (at least 1)
  float inv_temperature;
  float cfg_coef;
  bool use_cfg;
  bool greedy;
  int64_t top_k;            // active when 0 < top_k < V
  double top_p;             // active when < 1
};

// Block-wide reductions with a fixed tree (warp shuffles, then warp 0 over the warp partials): every thread gets
// the result. `scratch` holds kWarps values; the leading __syncthreads makes back-to-back calls safe.
template <typename T, typename Op>
__device__ T block_reduce(T value, Op op, T* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = value;
  __syncthreads();
  value = scratch[0];
  for (int w = 1; w < kWarps; ++w) value = op(value, scratch[w]);
  return value;
}

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct Min {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};

template <typename scalar_t>
struct Row {
  const scalar_t* cond;
  const scalar_t* uncond;
  SampleArgs args;

  // z_i (x_i itself when greedy), computed exactly as the spec does.
  __device__ float logit(int64_t i) const {
    const float x = mixed_logit(static_cast<float>(cond[i]), args.use_cfg ? static_cast<float>(uncond[i]) : 0.0f,
                                args.cfg_coef, args.use_cfg);
    return args.greedy ? x : scaled_logit(x, args.inv_temperature);
  }
};

__device__ float weight_of(float z, float top) {
  return static_cast<float>(exp(static_cast<double>(z - top)));
}

// Sum over tokens ranked at or above both `at` and `kept` (rank keys) of exp(z - top) (WEIGHTED) or 1.
template <bool WEIGHTED, typename scalar_t>
__device__ double mass_from(const Row<scalar_t>& row, uint64_t at, uint64_t kept, float top, double* scratch) {
  const uint64_t bound = at > kept ? at : kept;
  const int64_t n = row.args.num_tokens;
  double mass = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float z = row.logit(i);
    if (rank_key(z, i, n) >= bound) mass += WEIGHTED ? static_cast<double>(weight_of(z, top)) : 1.0;
  }
  return block_reduce(mass, Sum(), scratch);
}

// The largest rank key whose mass-from (within `kept`) is >= target: the order-key bits, then the index bits.
template <bool WEIGHTED, typename scalar_t>
__device__ uint64_t boundary(const Row<scalar_t>& row, uint64_t kept, float top, double target, double* scratch) {
  uint64_t key = 0;
  for (int bit = kOrderKeyBits - 1; bit >= 0; --bit) {
    const uint64_t candidate = key | (uint64_t{1} << (32 + bit));
    if (mass_from<WEIGHTED>(row, candidate, kept, top, scratch) >= target) key = candidate;
  }
  for (int bit = row.args.index_bits - 1; bit >= 0; --bit) {
    const uint64_t candidate = key | (uint64_t{1} << bit);
    if (mass_from<WEIGHTED>(row, candidate, kept, top, scratch) >= target) key = candidate;
  }
  return key;
}

// Exclusive block scan of per-thread values (warp shuffles, then the warp totals); every thread gets the block sum
// in `total`, summed in the same order.
__device__ double block_exclusive_scan(double value, double* scratch, double* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double inclusive = value;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const double other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  double exclusive = __shfl_up_sync(0xffffffffu, inclusive, 1);
  if (lane == 0) exclusive = 0.0;
  __syncthreads();
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  double before = 0.0, sum = 0.0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += scratch[w];
    sum += scratch[w];
  }
  *total = sum;
  return before + exclusive;
}

// The inverse-CDF draw over the kept tokens in vocabulary order (reference.py, step 5). Each thread owns a
// contiguous segment; it rescans it from its exclusive prefix for the first crossing, and the block takes the
// lowest index found (a segment whose prefix already exceeds the threshold offers its first drawable token, which
// loses to any earlier crossing). Only kept tokens with e > 0 are ever candidates.
template <typename scalar_t>
__device__ int64_t draw(const Row<scalar_t>& row, uint64_t kept, float top, double u, double* scratch,
                        int64_t* index_scratch) {
  const int64_t n = row.args.num_tokens;
  const int64_t segment = (n + kThreads - 1) / kThreads;
  const int64_t begin = threadIdx.x * segment < n ? threadIdx.x * segment : n;
  const int64_t end = begin + segment < n ? begin + segment : n;
  double own = 0.0;
  int64_t last = -1;
  for (int64_t i = begin; i < end; ++i) {
    const float z = row.logit(i);
    const float e = weight_of(z, top);
    if (e > 0.0f && rank_key(z, i, n) >= kept) {
      own += e;
      last = i;
    }
  }
  double total;
  double through = block_exclusive_scan(own, scratch, &total);
  const double threshold = u * total;
  int64_t first = n;
  for (int64_t i = begin; i < end; ++i) {
    const float z = row.logit(i);
    const float e = weight_of(z, top);
    if (e > 0.0f && rank_key(z, i, n) >= kept) {
      through += e;
      if (through > threshold) {
        first = i;
        break;
      }
    }
  }
  first = block_reduce(first, Min(), index_scratch);
  last = block_reduce(last, Max(), index_scratch);
  return first < n ? first : last;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sample_tokens_kernel(SampleArgs args) {
  __shared__ double scratch[kWarps];
  __shared__ float float_scratch[kWarps];
  __shared__ int64_t index_scratch[kWarps];
  const int64_t row_id = blockIdx.x;
  const int64_t n = args.num_tokens;
  const scalar_t* cond = static_cast<const scalar_t*>(args.logits) + row_id * n;
  const Row<scalar_t> row{cond, cond + args.uncond_offset, args};

  float top = -INFINITY;
  int64_t bad = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float z = row.logit(i);
    bad |= is_bad_logit(z);
    top = z > top ? z : top;
  }
  bad = block_reduce(bad, Max(), index_scratch);
  top = block_reduce(top, Max(), float_scratch);
  int64_t token;
  if (bad || top == -INFINITY) {
    token = kInvalidToken;
  } else if (args.greedy) {
    int64_t first = n;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      if (row.logit(i) == top && i < first) first = i;
    }
    token = block_reduce(first, Min(), index_scratch);
  } else {
    uint64_t kept = 0;
    if (top_k_active(args.top_k, n)) {
      kept = boundary<false>(row, kept, top, static_cast<double>(args.top_k), scratch);
    }
    if (args.top_p < 1.0) {
      const double total = mass_from<true>(row, kept, kept, top, scratch);
      kept = boundary<true>(row, kept, top, args.top_p * total, scratch);
    }
    token = draw(row, kept, top, args.uniforms[row_id], scratch, index_scratch);
  }
  if (threadIdx.x == 0) args.tokens[row_id] = token;
}

at::Tensor sample_tokens_cuda(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k,
                              double top_p, double cfg_coef, bool use_cfg) {
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor, got one on ", logits.device());
  const int64_t batch = check_sample_tokens_args(logits, uniforms, temperature, top_k, top_p, use_cfg);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t num_codebooks = logits.size(1), num_tokens = logits.size(2);
  auto tokens = at::empty({batch, num_codebooks}, logits.options().dtype(at::kLong));
  const int64_t rows = batch * num_codebooks;
  if (rows == 0) return tokens;
  int index_bits = 1;
  while ((int64_t{1} << index_bits) < num_tokens) ++index_bits;
  SampleArgs args{logits.data_ptr(),
                  uniforms.data_ptr<double>(),
                  tokens.data_ptr<int64_t>(),
                  num_tokens,
                  rows * num_tokens,
                  index_bits,
                  temperature > 0.0 ? inverse_temperature(temperature) : 0.0f,
                  static_cast<float>(cfg_coef),
                  use_cfg,
                  temperature == 0.0,
                  top_k,
                  top_p};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sample_tokens_cuda", [&] {
    sample_tokens_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(args);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return tokens;
}

}  // namespace
}  // namespace sampling
}  // namespace mmdkernels

TORCH_LIBRARY_IMPL(mmdkernels, CUDA, m) { m.impl("sample_tokens", &mmdkernels::sampling::sample_tokens_cuda); }
