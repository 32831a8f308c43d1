// CPU tile machinery shared by the shuffle (mmd_cpu.cpp) and dHSIC (dhsic_cpu.cpp) kernels: the feature-slice
// layout, distance tiles by GEMM (gemm.h), vectorised chain evaluation, gradient GEMMs. (Argument checks and the
// bandwidth plan: mmd_args.h, shared with CUDA.)
#pragma once

#include <ATen/ATen.h>

#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define MMD_HAS_MXCSR 1
#endif

#include "mmd/mmd_args.h"
#include "mmd/mmd_tile.h"

namespace mmdkernels {
namespace mmd {

constexpr int64_t kTileBudgetFloats = int64_t(1) << 20;
constexpr int64_t kChunk = 256;  // columns processed per vectorised chunk of a row

// Flushes denormals to zero in this thread while alive. The bandwidth chain's powers (v^1000) pass through the
// denormal range on their way to 0, and denormal multiplies cost ~100 cycles on x86; values below 1e-38 do not
// change a sum of kernels that is at least exp(0) = 1 per diagonal anyway. (The GPU build flushes by
// --use_fast_math.)
class FlushDenormals {
 public:
#ifdef MMD_HAS_MXCSR
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// sum of v[0..len) in double, vectorised.
inline double sum_chunk(const float* v, int64_t len) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t m = 0; m < len; ++m) s += v[m];
  return s;
}

// e[j][m] = exp(-coef_j * dist[m]) for every bandwidth, by the plan's chain (eval_bandwidths, vectorised).
void bandwidths_chunk(const float* dist, const BandwidthPlan& plan, float (*e)[kChunk], int64_t len);

// The feature axis as S slices of equal width: one slice of K*D when the only group holds every codebook (joint
// mode needs just the joint distance), else one slice per codebook. Groups are re-expressed over slices; their
// values are checked here (0/1, every row selecting a codebook), the rest of the contract by check_groups.
struct SliceLayout {
  int64_t num_slices;
  int64_t width;
  std::vector<std::vector<int>> group_members;  // slices of each group
};

SliceLayout make_layout(const at::Tensor& groups, int64_t num_codebooks, int64_t dim, bool allow_joint_slice);

// [N, S, width] view of the samples as slice s: [N, width] with row stride S*width.
at::Tensor slice_of(const at::Tensor& samples, const SliceLayout& layout, int64_t s);

// Squared norms per slice: [S, N].
at::Tensor slice_norms(const at::Tensor& samples, const SliceLayout& layout);

// One (row block x column block) tile of the N x N plane.
struct Tile {
  int64_t row0, rows, col0, cols;
};

// A buffer for `slices` distance tiles and the blocking of the N x N plane into tiles that fit it: row blocks of up
// to 256 rows (GEMM-friendly) times column blocks sized to the budget, so both GEMM operands stay cache-resident
// (full-width row blocks would stream all of B from memory for every few rows once N is large).
class TilePlane {
 public:
  TilePlane(int64_t n, int64_t num_slices, const at::TensorOptions& options);
  // The tiles of rows [row_begin, row_end) against every column (the whole plane by default).
  std::vector<Tile> tiles(int64_t row_begin = 0, int64_t row_end = -1) const;
  // slice s of a tile as a contiguous [rows, cols] tensor, and the start of its row i
  at::Tensor slice(int64_t s, const Tile& tile) const;
  float* row(int64_t s, const Tile& tile, int64_t i) const { return data_ + s * tile_floats_ + i * tile.cols; }

 private:
  int64_t n_, row_block_, col_block_, tile_floats_;
  at::Tensor buffer_;
  float* data_;
};

// Fills the tile's slices with the dot products of a's rows against b's columns.
void dot_tiles(const at::Tensor& a, const at::Tensor& b, const SliceLayout& layout, const Tile& tile,
               const TilePlane& plane);

// Where gradient rows go: into grad's rows directly, or, for the shuffled samples y[m, k] = z[perms[k, m], k],
// through the permutations into the gradient of z (so y's gradient is never stored).
struct GradientSink {
  at::Tensor grad;   // [N, K, D] float32
  at::Tensor perms;  // [K, N] int64, or undefined for direct rows
  // rows [row0, row0 + update.size(0)) of slice s += update
  void add(const SliceLayout& layout, int64_t s, int64_t row0, const at::Tensor& update) const;
};

// sink_a[tile rows] += scale * (rowsum(W) * a[rows] - W @ b[cols]), slice by slice; W = the tile (weights in place).
void add_row_gradient(const TilePlane& plane, const Tile& tile, const at::Tensor& a, const at::Tensor& b,
                      const SliceLayout& layout, double scale, const GradientSink& sink_a);

// sink_b[tile cols] += scale * (colsum(W) * b[cols] - W^T @ a[rows]): the column side of the xy term.
void add_column_gradient(const TilePlane& plane, const Tile& tile, const at::Tensor& a, const at::Tensor& b,
                         const SliceLayout& layout, double scale, const GradientSink& sink_b);

}  // namespace mmd
}  // namespace mmdkernels
