// Few-row linear layer on the CPU: y [M, N] = act(scale * (x [M, D] @ weight [N, D]^T) + bias) for the M <= 16 rows
// of one decode step (act: identity or GELU in its erf form, linear_kernel.h; fused: the MLP costs no extra pass).
// Weights float32, bfloat16 or int8 with a float32 scale per output channel; x and the accumulation are float32.
//
// At decode time a step multiplies a handful of rows by every weight matrix of the model once, so it is bound by
// how fast the weights stream from memory. A general GEMM packs the weight panel first (one extra read and write of
// every weight per call, see benchmarks/bench_linear.py); this kernel reads each weight once, in place
// (csrc/linear/linear_kernel.h): a block of R weight rows is streamed over D one cache line at a time (16 float32,
// 32 bfloat16 or 64 int8 weights, widened to float32 in registers) while the rows of x are multiplied into vector
// accumulators, at most 4 rows of x per pass (6 with AVX2, linear_kernel.h) so that the accumulators stay in registers;
// 16 rows (classifier-free guidance) take several passes over the same R weight rows, the later ones from L1 (narrow
// weights widened once, by the first pass). D is cut in chunks (16 KiB of x for all rows together) so that x stays in
// L1 while a group of 8 weight rows streams past it. At the end of a group its accumulators are summed across lanes by
// a transpose tree (16 accumulators -> one vector in 15 adds; csrc/linear/linear_vec.h), not one by one. The int8 scale
// is applied once per output, in the epilogue. Threads (at::parallel_for) split the weight rows in groups of 8; each
// output is summed by one thread, in an order that does not depend on the thread count. R, the weight rows of a block:
// several adjacent ones (fewest loads per FMA), several 8 / R rows apart (each in its own 4 KiB page when rows are
// short), one (a single sequential stream of weights) or one from each of R segments of the thread's rows (R streams
// that each run on through consecutive rows), whichever streams faster for the shape on this machine, measured on the
// first calls (csrc/linear/blocking.h); the order of summation is the same in all four.
// From 5 rows on, bfloat16 weights go through AMX tiles where the CPU has them (csrc/linear/linear_amx.h: x split into
// three bfloat16 parts, float32 accumulation), since the FMA kernel is then bound by its FMAs (16 rows: one FMA per
// weight and row, against 2 bytes of weight) rather than by memory; float32 weights from 13 rows on (split exactly into
// three bfloat16 parts too: 16 rows of float32 FMAs exceed this CPU's FMA rate). int8 weights go through AMX-INT8 tiles
// at every row count where the CPU has them (csrc/linear/linear_amx_int8.h: x as four 8-bit digits on a fixed-point
// grid of its row, the weights multiplied as stored; the FMA kernel widens every int8 weight with two instructions and
// is bound by them already at one row).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "linear/blocking.h"
#include "linear/linear_amx.h"
#include "linear/linear_amx_int8.h"
#include "linear/linear_checks.h"
#include "linear/linear_kernel.h"

namespace mmdkernels::linear {

// Rows of x from which bfloat16 weights go through AMX tiles where the CPU has them (linear_amx.h): the tiles cost
// the same at any row count up to 16, the FMA kernel's work grows with the rows. Measured (RESULTS.md, session 6):
// the tiles 0.64-0.97x as fast as the FMA kernel at 1-2 rows, 0.92-1.04x at 4, 1.13-1.27x at 5, 1.3-2.0x at 8-16.
constexpr int64_t kAmxMinRows = 5;
// float32 weights need six tile products and an exact three-part split of every weight (linear_amx.h): measured
// (RESULTS.md, session 7) 0.7-0.86x as fast as the FMA kernel at 5-8 rows, 0.92-1.04x at 12, 1.02-1.4x at 16.
constexpr int64_t kAmxFloatMinRows = 13;

template <typename T>
using RowsBlockFn = void (*)(const float*, int64_t, const T*, int64_t, float*, int64_t, int64_t, int64_t, Epilogue);

template <typename T, int... Ms>
static constexpr auto make_table(std::integer_sequence<int, Ms...>) {
  return std::array<RowsBlockFn<T>, sizeof...(Ms)>{&rows_block<T, Ms + 1, kMaxPassRows, wide_rows<T, Ms + 1>(),
                                                               library_splits<T, Ms + 1>(), 1,
                                                               bf16_pairs<T>(Ms + 1)>...};
}
template <typename T, int... Ms>
static constexpr auto make_spread_table(std::integer_sequence<int, Ms...>) {
  return std::array<RowsBlockFn<T>, sizeof...(Ms)>{
      &rows_block<T, Ms + 1, kMaxPassRows, wide_rows<T, Ms + 1>(), library_splits<T, Ms + 1>(),
                  kGroupRows / wide_rows<T, Ms + 1>(), bf16_pairs<T>(Ms + 1)>...};
}
template <typename T, int... Ms>
static constexpr auto make_single_table(std::integer_sequence<int, Ms...>) {
  return std::array<RowsBlockFn<T>, sizeof...(Ms)>{
      &rows_block<T, Ms + 1, single_pass_rows<T>(), 1, library_splits<T, Ms + 1>(), 1, bf16_pairs<T>(Ms + 1)>...};
}

template <typename T, int... Ms>
static constexpr auto make_segments_table(std::integer_sequence<int, Ms...>) {
  return std::array<RowsBlockFn<T>, sizeof...(Ms)>{
      &rows_segments<T, Ms + 1, kMaxPassRows, wide_rows<T, Ms + 1>(), library_splits<T, Ms + 1>(),
                     bf16_pairs<T>(Ms + 1)>...};
}

template <typename T>
static RowsBlockFn<T> rows_kernel(int64_t rows, Blocking blocking) {
  static constexpr auto wide = make_table<T>(std::make_integer_sequence<int, kMaxRows>{});
  static constexpr auto spread = make_spread_table<T>(std::make_integer_sequence<int, kMaxRows>{});
  static constexpr auto single = make_single_table<T>(std::make_integer_sequence<int, kMaxRows>{});
  static constexpr auto segments = make_segments_table<T>(std::make_integer_sequence<int, kMaxRows>{});
  switch (blocking) {
    case Blocking::kSpread: return spread[rows - 1];
    case Blocking::kSingle: return single[rows - 1];
    case Blocking::kSegments: return segments[rows - 1];
    default: return wide[rows - 1];
  }
}

#if defined(MMDKERNELS_LINEAR_AMX)
// Weight rows in whole tiles of 16 across the threads through `tile_rows(row0, row1)`, the last out_features % 16
// through the FMA kernel.
template <typename T, typename TileRows>
static void run_tiles(const float* xp, int64_t ldx, int64_t rows, const T* weight, int64_t dim, float* yp,
                      int64_t out_features, int64_t grain, const Epilogue& epilogue, const TileRows& tile_rows) {
  const int64_t tiles = out_features / amx::kTileRows, tiled = tiles * amx::kTileRows;
  at::parallel_for(0, tiles, std::max<int64_t>(1, grain / 2), [&](int64_t begin, int64_t end) {
    tile_rows(begin * amx::kTileRows, end * amx::kTileRows);
  });
  if (tiled < out_features)
    rows_kernel<T>(rows, Blocking::kWide)(xp, ldx, weight, dim, yp, out_features, tiled, out_features, epilogue);
}
#endif

template <typename T>
static at::Tensor run(const at::Tensor& x, const T* weight, int64_t out_features, const float* scale,
                      const std::optional<at::Tensor>& bias, bool gelu) {
  const int64_t rows = x.size(0), dim = x.size(1);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0 || out_features == 0) return y;
  const Epilogue epilogue{scale, bias.has_value() ? bias->data_ptr<float>() : nullptr, gelu};
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  // Tasks are groups of 8 weight rows (every R divides 8), about 8 KiB of weights per task at least: enough to
  // amortise a task, small enough to balance the threads.
  const int64_t groups = (out_features + 7) / 8;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(dim * static_cast<int64_t>(sizeof(T)) * 8, 1));
#if defined(MMDKERNELS_LINEAR_AMX)
  if constexpr (std::is_same_v<T, int8_t>) {
    if (dim >= amx::kDigitColumns && dim <= amx::kMaxDigitDim && out_features >= amx::kTileRows &&
        amx::int8_available()) {
      at::Tensor packed = at::empty({amx::digits_packed_bytes(rows, dim)}, x.options().dtype(at::kChar));
      int8_t* packed_x = packed.data_ptr<int8_t>();
      std::array<double, kMaxRows> inverse_scale;
      if (amx::pack_digits(xp, ldx, rows, dim, packed_x, inverse_scale.data())) {
        const auto block = amx::digit_rows_kernel(rows);
        run_tiles<T>(xp, ldx, rows, weight, dim, yp, out_features, grain, epilogue, [&](int64_t row0, int64_t row1) {
          block(packed_x, inverse_scale.data(), xp, ldx, rows, weight, dim, yp, out_features, row0, row1, epilogue);
        });
        return y;
      }
    }
  }
  if constexpr (!std::is_same_v<T, int8_t>) {
    const int64_t min_rows = std::is_same_v<T, float> ? kAmxFloatMinRows : kAmxMinRows;
    if (rows >= min_rows && dim >= amx::kTileColumns && out_features >= amx::kTileRows && amx::available()) {
      at::Tensor packed = at::empty({amx::packed_size(rows, dim)}, x.options().dtype(at::kShort));
      auto* packed_x = reinterpret_cast<uint16_t*>(packed.data_ptr<int16_t>());
      amx::pack_x(xp, ldx, rows, dim, packed_x);
      run_tiles<T>(xp, ldx, rows, weight, dim, yp, out_features, grain, epilogue, [&](int64_t row0, int64_t row1) {
        amx::rows_block<T>(packed_x, xp, ldx, rows, weight, dim, yp, out_features, row0, row1, epilogue);
      });
      return y;
    }
  }
#endif
  const BlockingPlan plan = plan_blocking(
      {static_cast<int>(sizeof(T)), rows, dim, out_features, static_cast<int>(at::get_num_threads())});
  const RowsBlockFn<T> block = rows_kernel<T>(rows, plan.blocking);
  at::Tensor ordered;  // x in the order bfloat16 pair loads read it (linear_kernel.h, bf16_pairs)
  if (bf16_pairs<T>(rows)) {
    ordered = at::empty({dim}, x.options());
    bf16_pair_order(xp, dim, ordered.data_ptr<float>());
    xp = ordered.data_ptr<float>();
  }
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    block(xp, ldx, weight, dim, yp, out_features, begin * 8, std::min(end * 8, out_features), epilogue);
  });
  if (plan.measure)
    record_blocking(plan, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return y;
}

at::Tensor small_batch_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  bool gelu) {
  check_rows_and_bias(x, weight, bias, kMaxRows);
  MMD_CHECK_DTYPE(weight, at::kFloat);
  return run<float>(x, weight.data_ptr<float>(), weight.size(0), nullptr, bias, gelu);
}

at::Tensor small_batch_linear_quantized_cpu(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& scale,
                                            const std::optional<at::Tensor>& bias, bool gelu) {
  check_rows_and_bias(x, weight, bias, kMaxRows);
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kChar,
              "weight must have dtype BFloat16 or Char (int8), got ", weight.scalar_type());
  check_scale(x, weight, scale);
  const int64_t out_features = weight.size(0);
  if (weight.scalar_type() == at::kBFloat16) {
    const auto* bits = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
    return run<uint16_t>(x, bits, out_features, nullptr, bias, gelu);
  }
  return run<int8_t>(x, weight.data_ptr<int8_t>(), out_features, scale->data_ptr<float>(), bias, gelu);
}

std::vector<std::string> tile_paths() {
  std::vector<std::string> paths;
#if defined(MMDKERNELS_LINEAR_AMX)
  if (amx::available()) paths.emplace_back("bf16");
  if (amx::int8_available()) paths.emplace_back("int8");
#endif
  return paths;
}

}  // namespace mmdkernels::linear

TORCH_LIBRARY_IMPL(mmdkernels, CompositeExplicitAutograd, m) {
  m.impl("linear_tile_paths", &mmdkernels::linear::tile_paths);
}

TORCH_LIBRARY_IMPL(mmdkernels, CPU, m) {
  m.impl("small_batch_linear", &mmdkernels::linear::small_batch_linear_cpu);
  m.impl("small_batch_linear_quantized", &mmdkernels::linear::small_batch_linear_quantized_cpu);
}
