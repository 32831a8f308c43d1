// The "own" float32 GEMM provider (gemm.h): C = alpha A B + beta C on packed panels and a register-blocked
// micro-kernel of our own, for CPUs where the BLAS torch ships runs far below the machine's FMA rate (MKL on AMD
// EPYCs: ~40 % of peak on Zen 3). BLIS's loop order: column blocks of B (kNc), depth blocks (kKc) packed into panels
// of kNr columns (from L3/L2), row blocks of A (kMc) packed into panels of kMr rows (L2), then one kMr x kNr block of
// C in vector registers per (row panel, column panel), summed over the depth block. No torch dependency; compiled
// once per ISA library (AVX-512: 12 x 32 = 24 zmm accumulators; AVX2 + FMA: 6 x 16 = 12 ymm), the register block
// of common/register_block.h shared with dHSIC's and the RVQ encoder's micro-kernels. Single-threaded: the caller splits C among threads.
//
// Summation order: every element sums its products in depth order within a block of kKc, blocks added in order, so
// a result does not depend on the thread count or on where a row or column falls in its panel.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/register_block.h"

namespace mmdkernels {
namespace gemm {
namespace packed {

using simd::Vec;
constexpr int kLanes = simd::kLanes;
constexpr int kMr = simd::kBlockRows;
constexpr int kVecs = simd::kBlockVecs;  // vectors of columns per register block
constexpr int kNr = simd::kBlockCols;    // columns per packed panel of B
constexpr int64_t kKc = 256;             // depth per packed block
constexpr int64_t kMc = kMr * 20;        // rows of A packed at once: kMc x kKc floats stay in L2
constexpr int64_t kNc = 512;             // columns of B packed at once: kKc x kNc floats (512 KiB) in L2

// A strided matrix: element (i, j) at data[i * row_stride + j * col_stride] (a row-major matrix or a transposed view).
struct Matrix {
  const float* data;
  int64_t row_stride, col_stride;
};

// rows [i0, i0 + rows) x depth [p0, p0 + depth) of m into panels of Width rows, [panel][depth][Width], zero past
// `rows`: A's row panels (Width = kMr), and B's column panels as the rows of B^T (Width = kNr).
template <int Width>
inline void pack_panels(const Matrix& m, int64_t i0, int64_t rows, int64_t p0, int64_t depth, float* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += Width) {
    const int64_t height = std::min<int64_t>(Width, rows - r0);
    float* panel = out + r0 * depth;
    if (m.row_stride == 1) {  // a panel's rows are contiguous at each depth
      for (int64_t p = 0; p < depth; ++p) {
        const float* src = m.data + (p0 + p) * m.col_stride + i0 + r0;
        for (int64_t r = 0; r < height; ++r) panel[p * Width + r] = src[r];
        for (int64_t r = height; r < Width; ++r) panel[p * Width + r] = 0.0f;
      }
    } else {
      for (int64_t r = 0; r < Width; ++r) {
        if (r < height) {
          const float* src = m.data + (i0 + r0 + r) * m.row_stride + p0 * m.col_stride;
          for (int64_t p = 0; p < depth; ++p) panel[p * Width + r] = src[p * m.col_stride];
        } else {
          for (int64_t p = 0; p < depth; ++p) panel[p * Width + r] = 0.0f;
        }
      }
    }
  }
}

// c[r * ldc + q] (r < rows, q < cols) = alpha * (a_panel^T b_panel)[r][q] + beta * c (beta == 0: c is not read,
// so garbage or NaN in it does not propagate).
inline void micro_kernel(int64_t depth, const float* a_panel, const float* b_panel, float* c, int64_t ldc, int rows,
                         int cols, float alpha, float beta) {
  Vec acc[kMr][kVecs];
  simd::accumulate_block<kMr>(depth, a_panel, b_panel, acc);
  using simd::fmadd, simd::load, simd::mul, simd::store;
  const Vec valpha = simd::broadcast(alpha), vbeta = simd::broadcast(beta);
  if (rows == kMr && cols == kNr) {
#pragma GCC unroll 16
    for (int r = 0; r < kMr; ++r) {
#pragma GCC unroll 4
      for (int q = 0; q < kVecs; ++q) {
        float* o = c + r * ldc + q * kLanes;
        store(o, beta == 0.0f ? mul(valpha, acc[r][q]) : fmadd(vbeta, load(o), mul(valpha, acc[r][q])));
      }
    }
    return;
  }
  alignas(64) float buffer[kNr];
#pragma GCC unroll 16
  for (int r = 0; r < kMr; ++r) {
    if (r >= rows) break;
#pragma GCC unroll 4
    for (int q = 0; q < kVecs; ++q) store(buffer + q * kLanes, mul(valpha, acc[r][q]));
    float* o = c + r * ldc;
    for (int q = 0; q < cols; ++q) o[q] = beta == 0.0f ? buffer[q] : buffer[q] + beta * o[q];
  }
}

// Scratch for the packed panels of one thread.
struct Workspace {
  std::vector<float> a, b;
};

// C [m, n] (row stride ldc, unit column stride) = alpha A [m, k] B [k, n] + beta C, on the calling thread.
inline void gemm(float* c, int64_t ldc, const Matrix& a, const Matrix& b, int64_t m, int64_t n, int64_t k, float alpha,
                 float beta, Workspace& work) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // alpha * 0 + beta * C
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    }
    return;
  }
  const int64_t round_up = kMr * kNr;  // panels are whole
  work.a.resize(std::min<int64_t>(kMc, (m + kMr - 1) / kMr * kMr) * std::min(kKc, k) + round_up);
  work.b.resize(std::min<int64_t>(kNc, (n + kNr - 1) / kNr * kNr) * std::min(kKc, k) + round_up);
  for (int64_t j0 = 0; j0 < n; j0 += kNc) {
    const int64_t cols = std::min(kNc, n - j0);
    for (int64_t p0 = 0; p0 < k; p0 += kKc) {
      const int64_t depth = std::min(kKc, k - p0);
      const float block_beta = p0 == 0 ? beta : 1.0f;  // later depth blocks add to the first's result
      pack_panels<kNr>(Matrix{b.data, b.col_stride, b.row_stride}, j0, cols, p0, depth, work.b.data());  // B^T
      for (int64_t i0 = 0; i0 < m; i0 += kMc) {
        const int64_t rows = std::min(kMc, m - i0);
        pack_panels<kMr>(a, i0, rows, p0, depth, work.a.data());
        for (int64_t c0 = 0; c0 < cols; c0 += kNr) {
          const float* b_panel = work.b.data() + c0 * depth;
          const int width = static_cast<int>(std::min<int64_t>(kNr, cols - c0));
          for (int64_t r0 = 0; r0 < rows; r0 += kMr) {
            micro_kernel(depth, work.a.data() + r0 * depth, b_panel, c + (i0 + r0) * ldc + j0 + c0, ldc,
                         static_cast<int>(std::min<int64_t>(kMr, rows - r0)), width, alpha, block_beta);
          }
        }
      }
    }
  }
}

}  // namespace packed
}  // namespace gemm
}  // namespace mmdkernels
