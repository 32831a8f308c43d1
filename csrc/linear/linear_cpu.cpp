// Few-row linear layer on the CPU: y [M, N] = act(x [M, D] @ weight [N, D]^T + bias) for the M <= 16 rows of one
// decode step (act: identity or the exact GELU, fused so that the MLP's activation costs no extra pass).
//
// At decode time a step multiplies a handful of rows by every weight matrix of the model once, so it is bound by
// how fast the weights stream from memory. A general GEMM packs the weight panel first (one extra read and write of
// every weight per call, see benchmarks/bench_linear.py); this kernel reads each weight once, in place: a block of R
// weight rows is streamed over D in 16-float vectors while all M rows of x (a few KiB, resident in L1) are
// multiplied into M x R vector accumulators, which are summed across lanes once at the end of the row block.
// R shrinks as M grows so that the M * R accumulators stay in the 32 vector registers of AVX-512.
// Threads (at::parallel_for) split the weight rows in groups of 8; each output is summed by one thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <utility>

#include "common/checks.h"

namespace mmdkernels::linear {

constexpr int kLanes = 16;
constexpr int64_t kMaxRows = 16;
// GCC/Clang vector extensions: portable (lowered to the widest vectors -march allows), unaligned loads allowed.
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));

// Weight rows per block, by M: measured on the 2-core AVX-512 Xeon this was written on (benchmarks/bench_linear.py).
constexpr int block_rows(int m) { return m <= 2 ? 8 : (m <= 8 ? 2 : 1); }
// A software prefetch (into L2) this many floats ahead of every weight stream. One core has too few loads in flight
// to reach the memory's bandwidth on its own once there are several FMAs per weight vector (M > 1); prefetching
// 16 KiB ahead took the M = 4 stream from 7.5 to 12 GB/s there (13 GB/s is the core's copy bandwidth).
constexpr int64_t kPrefetchFloats = 4096;

static inline float lane_sum(Vec v) {
  float total = 0.f;
  for (int lane = 0; lane < kLanes; ++lane) total += v[lane];
  return total;
}

// The epilogue of one output: + bias, then the exact (erf) GELU when asked, as torch.nn.functional.gelu.
struct Epilogue {
  const float* bias;  // [N] or nullptr
  bool gelu;
  inline float operator()(float value, int64_t n) const {
    if (bias != nullptr) value += bias[n];
    return gelu ? 0.5f * value * (1.f + std::erf(value * static_cast<float>(M_SQRT1_2))) : value;
  }
};

// Output columns [n_begin, n_end) of y for the M rows of x. ldx, ldy: row strides of x and y; weight rows are D apart.
template <int M>
static void rows_block(const float* x, int64_t ldx, const float* weight, int64_t dim, float* y, int64_t ldy,
                       int64_t n_begin, int64_t n_end, Epilogue epilogue) {
  constexpr int R = block_rows(M);
  const int64_t full = dim - dim % kLanes;
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) {
    Vec acc[M][R];
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = Vec{};
    const float* w = weight + n * dim;
    for (int64_t k = 0; k < full; k += kLanes) {
      Vec wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        __builtin_prefetch(w + r * dim + k + kPrefetchFloats, 0, 1);  // prefetches never fault past the end
        wv[r] = *reinterpret_cast<const Vec*>(w + r * dim + k);
      }
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        const Vec xv = *reinterpret_cast<const Vec*>(x + m * ldx + k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[m][r] += xv * wv[r];
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < R; ++r) {
        float total = lane_sum(acc[m][r]);
        for (int64_t k = full; k < dim; ++k) total += x[m * ldx + k] * w[r * dim + k];
        y[m * ldy + n + r] = epilogue(total, n + r);
      }
    }
  }
  for (; n < n_end; ++n) {  // the last < R weight rows
    const float* w = weight + n * dim;
    for (int m = 0; m < M; ++m) {
      Vec acc = Vec{};
      for (int64_t k = 0; k < full; k += kLanes) acc += *reinterpret_cast<const Vec*>(x + m * ldx + k) *
                                                        *reinterpret_cast<const Vec*>(w + k);
      float total = lane_sum(acc);
      for (int64_t k = full; k < dim; ++k) total += x[m * ldx + k] * w[k];
      y[m * ldy + n] = epilogue(total, n);
    }
  }
}

using RowsBlockFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t,
                             Epilogue);

template <int... Ms>
static constexpr auto make_table(std::integer_sequence<int, Ms...>) {
  return std::array<RowsBlockFn, sizeof...(Ms)>{&rows_block<Ms + 1>...};
}

at::Tensor small_batch_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  bool gelu) {
  MMD_CHECK_DIM(x, 2);
  MMD_CHECK_DIM(weight, 2);
  MMD_CHECK_DTYPE(x, at::kFloat);
  MMD_CHECK_DTYPE(weight, at::kFloat);
  MMD_CHECK_DEVICE(weight, x.device());
  MMD_CHECK_CONTIGUOUS(weight);
  TORCH_CHECK(x.stride(1) == 1, "x must have unit stride in its last dim, got strides ", x.strides());
  const int64_t rows = x.size(0), dim = x.size(1), out_features = weight.size(0);
  TORCH_CHECK(rows <= kMaxRows, "x must have at most ", kMaxRows, " rows (a decode step), got shape ", x.sizes());
  TORCH_CHECK(weight.size(1) == dim, "weight must have shape (N, D = ", dim, ") to match x, got ", weight.sizes());
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    MMD_CHECK_DTYPE(*bias, at::kFloat);
    MMD_CHECK_DEVICE(*bias, x.device());
    MMD_CHECK_CONTIGUOUS(*bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "bias must have shape (N = ", out_features,
                "), got ", bias->sizes());
    bias_ptr = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0 || out_features == 0) return y;
  static constexpr auto table = make_table(std::make_integer_sequence<int, kMaxRows>{});
  const RowsBlockFn block = table[rows - 1];
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  // Tasks are groups of 8 weight rows (every R divides 8), about 64 KiB of weights per task at least: enough to
  // amortise a task, small enough to balance the threads.
  const int64_t groups = (out_features + 7) / 8;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    block(xp, ldx, wp, dim, yp, out_features, begin * 8, std::min(end * 8, out_features), Epilogue{bias_ptr, gelu});
  });
  return y;
}

}  // namespace mmdkernels::linear

TORCH_LIBRARY_IMPL(mmdkernels, CPU, m) { m.impl("small_batch_linear", &mmdkernels::linear::small_batch_linear_cpu); }
