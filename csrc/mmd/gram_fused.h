// dHSIC's per-codebook distance tiles on a micro-kernel of our own, the distance epilogue fused: for a block of rows x
// one pair of column panels the dot products over the codebook's D features stay in vector registers, become
// max(0, |a|^2 + |b|^2 - 2 a.b) there, and only the distances are stored (the GEMM path writes the dot tile, and the
// passes convert it). No torch dependency; compiled once per ISA library (AVX-512: panels of 16 columns, 12 rows a
// block, 24 zmm accumulators; AVX2 + FMA: panels of 8, 6 rows, 12 ymm: common/register_block.h). float32
// throughout, as the GEMM.
//
// Layout: every codebook's columns packed once per pass into pairs of panels, [K][pairs][D][2 P] (P columns side by
// side for each feature), zero past N, with the squared norms [K][pairs * 2 P] beside them (0 past N).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/register_block.h"

namespace mmdkernels {
namespace mmd {
namespace gram {

using simd::broadcast, simd::load, simd::store, simd::Vec, simd::zero;
constexpr int kPanel = simd::kLanes;
constexpr int kBlockRows = simd::kBlockRows;
constexpr int kPanels = simd::kBlockVecs;  // panels side by side in the register block
constexpr int kPair = simd::kBlockCols;    // columns per packed group of panels

// max(0, norm_a + norm_b - 2 dot), in sqdist_from_dot's order (mmd_tile.h)
#if defined(__AVX512F__)
inline Vec distance(Vec norm_a, Vec norm_b, Vec dot) {
  // maskz: _mm512_max_ps's undefined pass-through trips GCC 12's -Wmaybe-uninitialized
  return _mm512_maskz_max_ps(0xFFFF, _mm512_sub_ps(_mm512_add_ps(norm_a, norm_b), _mm512_add_ps(dot, dot)), zero());
}
#else
inline Vec distance(Vec norm_a, Vec norm_b, Vec dot) {
  return _mm256_max_ps(_mm256_sub_ps(_mm256_add_ps(norm_a, norm_b), _mm256_add_ps(dot, dot)), zero());
}
#endif

// The columns of every codebook, packed for the micro-kernel.
struct PackedColumns {
  int64_t n = 0, num_codebooks = 0, dim = 0, pairs = 0;
  std::vector<float> panels;  // [K][pairs][dim][kPair]
  std::vector<float> norms;   // [K][pairs * kPair]
  const float* pair(int64_t k, int64_t p) const { return panels.data() + ((k * pairs + p) * dim) * kPair; }
  const float* pair_norms(int64_t k, int64_t p) const { return norms.data() + (k * pairs + p) * kPair; }
};

// Packs z_k [N, dim] (codebook k at z + k * N * dim, rows contiguous) and norms [K, N] for k < K. `parallel_for`
// (begin, end, fn) runs fn over ranges of the K * pairs panels (at::parallel_for in the library).
template <typename ParallelFor>
PackedColumns pack_columns(const float* z, const float* norms, int64_t n, int64_t num_codebooks, int64_t dim,
                           ParallelFor&& parallel_for) {
  PackedColumns packed;
  packed.n = n;
  packed.num_codebooks = num_codebooks;
  packed.dim = dim;
  packed.pairs = (n + kPair - 1) / kPair;
  packed.panels.resize(num_codebooks * packed.pairs * dim * kPair);
  packed.norms.assign(num_codebooks * packed.pairs * kPair, 0.0f);
  parallel_for(0, num_codebooks * packed.pairs, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t k = index / packed.pairs, p = index % packed.pairs, c0 = p * kPair;
      const int64_t width = std::min<int64_t>(kPair, n - c0);
      float* panel = packed.panels.data() + index * dim * kPair;
      const float* rows = z + (k * n + c0) * dim;
      for (int64_t d = 0; d < dim; ++d) {
        for (int64_t c = 0; c < width; ++c) panel[d * kPair + c] = rows[c * dim + d];
        for (int64_t c = width; c < kPair; ++c) panel[d * kPair + c] = 0.0f;
      }
      std::copy(norms + k * n + c0, norms + k * n + c0 + width, packed.norms.data() + index * kPair);
    }
  });
  return packed;
}

// out[r * ld + c - first] = the distance of row r (of Rows rows of codebook k, transposed: xt[d * Rows + r], norms
// row_norms) and column c of pair p of codebook k, for the columns c in [lo, hi) (within the pair; first = the column
// of out[0]). The accumulators stay in registers across all of dim; a pair cut by the range goes through a buffer.
template <int Rows>
inline void distance_pair(const float* xt, const float* row_norms, const PackedColumns& packed, int64_t k, int64_t p,
                          int64_t lo, int64_t hi, int64_t first, float* out, int64_t ld) {
  const int64_t dim = packed.dim;
  const float* panel = packed.pair(k, p);
  Vec acc[Rows][kPanels];
  simd::accumulate_block<Rows>(dim, xt, panel, acc);
  const float* col_norms = packed.pair_norms(k, p);
  Vec norm_b[kPanels];
#pragma GCC unroll 4
  for (int q = 0; q < kPanels; ++q) norm_b[q] = load(col_norms + q * kPanel);
  const int64_t pair0 = p * kPair;
  if (lo == pair0 && hi == pair0 + kPair) {
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const Vec norm_a = broadcast(row_norms[r]);
      float* o = out + r * ld + (pair0 - first);
#pragma GCC unroll 4
      for (int q = 0; q < kPanels; ++q) store(o + q * kPanel, distance(norm_a, norm_b[q], acc[r][q]));
    }
  } else {
    alignas(64) float buffer[kPair];
#pragma GCC unroll 16  // every loop over acc unrolled: an indexed acc would live in memory, not registers
    for (int r = 0; r < Rows; ++r) {
      const Vec norm_a = broadcast(row_norms[r]);
#pragma GCC unroll 4
      for (int q = 0; q < kPanels; ++q) store(buffer + q * kPanel, distance(norm_a, norm_b[q], acc[r][q]));
      std::copy(buffer + (lo - pair0), buffer + (hi - pair0), out + r * ld + (lo - first));
    }
  }
}

template <int Rows>
inline void distance_pair_tail(int rows, const float* xt, const float* norms, const PackedColumns& packed, int64_t k,
                               int64_t p, int64_t lo, int64_t hi, int64_t first, float* out, int64_t ld) {
  if constexpr (Rows > 0) {
    if (rows == Rows) return distance_pair<Rows>(xt, norms, packed, k, p, lo, hi, first, out, ld);
    return distance_pair_tail<Rows - 1>(rows, xt, norms, packed, k, p, lo, hi, first, out, ld);
  }
}

// Distances of rows [row_begin, row_end) of codebook k (z_k, row norms `norms` [N] of codebook k) against the
// columns [col0, col0 + cols): out[(row - row_begin) * ld + c - col0]. Rows in blocks of kBlockRows (the last one
// smaller), each transposed into xt (resized here) and then meeting every pair of panels of the range (from L2).
inline void distance_block(const float* z_k, const float* norms, const PackedColumns& packed, int64_t k,
                           int64_t row_begin, int64_t row_end, int64_t col0, int64_t cols, float* out, int64_t ld,
                           std::vector<float>& xt) {
  const int64_t dim = packed.dim, col_end = col0 + cols;
  xt.resize(kBlockRows * dim);
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kBlockRows) {
    const int block = static_cast<int>(std::min<int64_t>(kBlockRows, row_end - r0));
    const float* x = z_k + r0 * dim;
    for (int r = 0; r < block; ++r) {
      for (int64_t d = 0; d < dim; ++d) xt[d * block + r] = x[r * dim + d];
    }
    for (int64_t p = col0 / kPair; p * kPair < col_end; ++p) {
      const int64_t lo = std::max(p * kPair, col0), hi = std::min((p + 1) * kPair, col_end);
      distance_pair_tail<kBlockRows>(block, xt.data(), norms + r0, packed, k, p, lo, hi, col0,
                                     out + (r0 - row_begin) * ld, ld);
    }
  }
}

}  // namespace gram
}  // namespace mmd
}  // namespace mmdkernels
