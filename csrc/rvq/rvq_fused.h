// The RVQ score tile on a micro-kernel of our own, the argmin fused: for a tile of rows x entries the dot products
// stay in vector registers, become scores |c|^2 - 2 r.c there, and only a running (min score, first index) per row
// and SIMD lane leaves them, so no score tile is written and read back (the GEMM path's cost on machines where the
// BLAS is far from the core's FMA peak). No torch dependency (a scratch benchmark can include it); compiled once
// per ISA library (AVX-512: panels of 16 entries, 12 rows a tile; AVX2 + FMA: panels of 8, 6 rows).
//
// Layout: a stage's codebook [C, D] is packed once per call into pairs of panels, [C_pad / (2 P)][D][2 P] (P entries
// of one panel side by side for each d), padded with zero entries whose squared norm is +inf (never chosen).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "rvq/rvq_tile.h"

namespace mmdkernels {
namespace rvq {
namespace fused {

#if defined(__AVX512F__)
constexpr int kPanel = 16;
constexpr int kTileRows = 12;  // 12 rows x 2 panels = 24 accumulators of 32 zmm (8 rows: 1.12x slower)
using Vec = __m512;
using IVec = __m512i;
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec broadcast(float v) { return _mm512_set1_ps(v); }
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec score_of(Vec sqnorm, Vec dot) { return _mm512_sub_ps(sqnorm, _mm512_add_ps(dot, dot)); }
inline IVec iload(const int32_t* p) { return _mm512_loadu_si512(p); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline void istore(int32_t* p, IVec v) { _mm512_storeu_si512(p, v); }
inline IVec lane_ids(int32_t first) {
  return _mm512_add_epi32(_mm512_set1_epi32(first), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                      14, 15));
}
// Keeps (score, id) where score < best (ordered compare: a NaN score never wins).
inline void keep_better(Vec score, IVec ids, float* best, int32_t* best_ids) {
  const Vec current = load(best);
  const __mmask16 better = _mm512_cmp_ps_mask(score, current, _CMP_LT_OQ);
  store(best, _mm512_mask_mov_ps(current, better, score));
  istore(best_ids, _mm512_mask_mov_epi32(iload(best_ids), better, ids));
}
#else
constexpr int kPanel = 8;
constexpr int kTileRows = 6;  // 6 rows x 2 panels = 12 accumulators of 16 ymm
using Vec = __m256;
using IVec = __m256i;
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec broadcast(float v) { return _mm256_set1_ps(v); }
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec score_of(Vec sqnorm, Vec dot) { return _mm256_sub_ps(sqnorm, _mm256_add_ps(dot, dot)); }
inline IVec iload(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline void istore(int32_t* p, IVec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline IVec lane_ids(int32_t first) {
  return _mm256_add_epi32(_mm256_set1_epi32(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline void keep_better(Vec score, IVec ids, float* best, int32_t* best_ids) {
  const Vec current = load(best);
  const Vec better = _mm256_cmp_ps(score, current, _CMP_LT_OQ);
  store(best, _mm256_blendv_ps(current, score, better));
  const __m256i keep = _mm256_castps_si256(better);
  istore(best_ids, _mm256_blendv_epi8(iload(best_ids), ids, keep));
}
#endif

constexpr int kPair = 2 * kPanel;  // entries per packed pair of panels
constexpr int32_t kNoIndex = std::numeric_limits<int32_t>::max();

// One stage's codebook packed for the micro-kernel.
struct PackedStage {
  int64_t entries = 0;  // C (real entries)
  int64_t pairs = 0;    // ceil(C / kPair)
  int64_t dim = 0;
  std::vector<float> panels;   // [pairs][dim][kPair]
  std::vector<float> sqnorms;  // [pairs * kPair], +inf past C
};

// Packs codebook [C, D] (row-major) with its squared norms [C].
inline PackedStage pack_stage(const float* codebook, const float* sqnorms, int64_t entries, int64_t dim) {
  PackedStage packed;
  packed.entries = entries;
  packed.dim = dim;
  packed.pairs = (entries + kPair - 1) / kPair;
  packed.panels.assign(packed.pairs * dim * kPair, 0.0f);
  packed.sqnorms.assign(packed.pairs * kPair, std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < entries; ++c) {
    float* column = packed.panels.data() + (c / kPair) * dim * kPair + c % kPair;
    const float* entry = codebook + c * dim;
    for (int64_t d = 0; d < dim; ++d) column[d * kPair] = entry[d];
    packed.sqnorms[c] = sqnorms[c];
  }
  return packed;
}

// Running best per row and lane over the pairs scanned so far: scores [rows][kPanel], first indices [rows][kPanel].
struct LaneBest {
  std::vector<float> score;
  std::vector<int32_t> index;
  void reset(int64_t rows) {
    score.assign(rows * kPanel, std::numeric_limits<float>::infinity());
    index.assign(rows * kPanel, kNoIndex);
  }
  // The row's first minimum over every lane (better_of: lowest score, ties to the lowest index).
  ScoredIndex merged(int64_t row) const {
    ScoredIndex best = no_candidate();
    for (int lane = 0; lane < kPanel; ++lane) {
      const int32_t index = this->index[row * kPanel + lane];
      if (index != kNoIndex) best = better_of(best, {score[row * kPanel + lane], index});
    }
    return best;
  }
};

// Scores rows x (pairs [pair_begin, pair_end)) of `packed` against residuals x [rows, dim] (row stride ldx) and
// folds them into `best` (rows best.score rows from row 0). Rows in tiles of kTileRows (then one smaller tile):
// the tile's accumulators stay in registers across all of D, one packed pair streams past them.
template <int Rows>
inline void score_tile(const float* x, int64_t ldx, const PackedStage& packed, int64_t pair_begin, int64_t pair_end,
                       float* best, int32_t* best_ids) {
  const int64_t dim = packed.dim;
  for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
    const float* panel = packed.panels.data() + pair * dim * kPair;
    Vec acc[Rows][2];
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = zero();
    for (int64_t d = 0; d < dim; ++d) {
      const Vec w0 = load(panel + d * kPair), w1 = load(panel + d * kPair + kPanel);
#pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r) {
        const Vec xv = broadcast(x[r * ldx + d]);
        acc[r][0] = fmadd(xv, w0, acc[r][0]);
        acc[r][1] = fmadd(xv, w1, acc[r][1]);
      }
    }
    const int32_t first = static_cast<int32_t>(pair * kPair);
    const Vec sq0 = load(packed.sqnorms.data() + pair * kPair), sq1 = load(packed.sqnorms.data() + pair * kPair + kPanel);
    const IVec ids0 = lane_ids(first), ids1 = lane_ids(first + kPanel);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      // lanes of the pair's second panel hold larger indices: fold the first panel first, so that equal scores keep
      // the lower index
      keep_better(score_of(sq0, acc[r][0]), ids0, best + r * kPanel, best_ids + r * kPanel);
      keep_better(score_of(sq1, acc[r][1]), ids1, best + r * kPanel, best_ids + r * kPanel);
    }
  }
}

template <int Rows>
inline void score_rows_tail(int64_t rows, const float* x, int64_t ldx, const PackedStage& packed, int64_t pb,
                            int64_t pe, float* best, int32_t* best_ids) {
  if constexpr (Rows > 0) {
    if (rows == Rows) return score_tile<Rows>(x, ldx, packed, pb, pe, best, best_ids);
    return score_rows_tail<Rows - 1>(rows, x, ldx, packed, pb, pe, best, best_ids);
  }
}

// Folds the scores of rows [0, rows) of x against every entry of `packed` into `best` (reset by the caller). Entries
// in chunks that stay in L2 while all the rows' tiles pass over them.
inline void score_rows(const float* x, int64_t ldx, int64_t rows, const PackedStage& packed, LaneBest& best) {
  constexpr int64_t kChunkBytes = 256 * 1024;
  const int64_t chunk_pairs = std::max<int64_t>(1, kChunkBytes / (packed.dim * kPair * 4));
  for (int64_t pb = 0; pb < packed.pairs; pb += chunk_pairs) {
    const int64_t pe = std::min(packed.pairs, pb + chunk_pairs);
    int64_t r0 = 0;
    for (; r0 + kTileRows <= rows; r0 += kTileRows) {
      score_tile<kTileRows>(x + r0 * ldx, ldx, packed, pb, pe, best.score.data() + r0 * kPanel,
                            best.index.data() + r0 * kPanel);
    }
    if (r0 < rows) {
      score_rows_tail<kTileRows - 1>(rows - r0, x + r0 * ldx, ldx, packed, pb, pe, best.score.data() + r0 * kPanel,
                                     best.index.data() + r0 * kPanel);
    }
  }
}

}  // namespace fused
}  // namespace rvq
}  // namespace mmdkernels
