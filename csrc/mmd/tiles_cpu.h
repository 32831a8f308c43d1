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

// The same in float lanes (each lane adds len / vector width values; callers keep len <= kChunk and add the result
// to a double): half the vector work of sum_chunk, error ~1e-7 of sum |v| (a float32 GEMM's level).
inline float sum_chunk_float(const float* v, int64_t len) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t m = 0; m < len; ++m) s += v[m];
  return s;
}

// The distance |a|^2 + |b|^2 - 2 a.b from a GEMM carries a rounding error of a few eps (|a|^2 + |b|^2) (more with a
// long dot product), which is all of it for (near-)duplicate samples: a duplicate gets d ~ 1e-4 instead of 0 and a
// kernel weight ~sum(coefs) on an a - b that is 0, which the GEMM form rowsum(W) a - W b cancels only to float32
// rounding of the largest weights. Entries with d <= kNearDuplicate (|a|^2 + |b|^2) are recomputed from a - b:
// exact duplicates get d = 0 exactly, and their gradient weight is then set to 0 (the exact W (a - b) = 0).
constexpr float kNearDuplicate = 1.0f / 1024.0f;

// dist[m] (the expanded distance of row_a and row m of rows_b, `stride` floats apart, `width` features) recomputed
// as sum_i (a_i - b_i)^2 where dist[m] <= kNearDuplicate (norm_a + norms_b[m]).
void refine_near_duplicates(float* dist, const float* row_a, float norm_a, const float* rows_b, const float* norms_b,
                            int64_t stride, int64_t width, int64_t len);

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

// One (row block x column block) tile of the N x N plane. For a symmetric term (xx, yy, dHSIC's Grams) the plane is
// covered by the pairs of row blocks only once: `diagonal` marks a row block against its own columns (both
// triangles computed, row side only), `mirrored` an off-diagonal tile whose transpose is never computed (its
// entries count twice; its gradient goes to its rows and, transposed, to its columns).
struct Tile {
  int64_t row0, rows, col0, cols;
  bool diagonal = false;
  bool mirrored = false;
};

// A buffer for `slices` distance tiles and the blocking of the N x N plane into tiles that fit it: row blocks of up
// to 256 rows (GEMM-friendly) times column blocks sized to the budget (floats for all slices together), so both GEMM
// operands stay cache-resident (full-width row blocks would stream all of B from memory for every few rows once N is
// large).
class TilePlane {
 public:
  TilePlane(int64_t n, int64_t num_slices, const at::TensorOptions& options,
            int64_t budget_floats = kTileBudgetFloats);
  // The tiles of rows [row_begin, row_end) against every column (the whole plane by default).
  std::vector<Tile> tiles(int64_t row_begin = 0, int64_t row_end = -1) const;
  // The tiles of a symmetric term owned by the rows [row_begin, row_end): on the fixed grid of row blocks, block r
  // owns its diagonal block and the column blocks r+1 .. r+(nb-1)/2 (cyclically; with an even count nb, block
  // r+nb/2 too when r < nb/2), so every unordered pair of blocks is computed once, every row block does the same
  // work, and any partition of the rows into ranges covers the plane exactly once (the row-range ops).
  std::vector<Tile> symmetric_tiles(int64_t row_begin = 0, int64_t row_end = -1) const;
  // rows per block of the grid (and the columns of a symmetric tile)
  int64_t row_block() const { return row_block_; }
  // slice s of a tile as a contiguous [rows, cols] tensor, and the start of its row i
  at::Tensor slice(int64_t s, const Tile& tile) const;
  float* row(int64_t s, const Tile& tile, int64_t i) const { return data_ + s * tile_floats_ + i * tile.cols; }

 private:
  int64_t n_, row_block_, col_block_, tile_floats_;
  at::Tensor buffer_;
  float* data_;
};

// The tiles in rounds whose tiles touch disjoint rows of the samples (a tile touches its rows and, when mirrored, its
// columns: the rows its sums and gradient go to), in the given order, greedily: a round's tiles can run on different
// threads with every write disjoint and the order of the additions into each row fixed by the round order, whatever
// the thread count. Overlap is judged on cells of `grid` rows (conservative for ranges that start inside a cell).
// The symmetric tiles of nb row blocks take nb rounds, the fewest possible (nb diagonal tiles, then nb / 2 pairs).
std::vector<std::vector<Tile>> disjoint_rounds(const std::vector<Tile>& tiles, int64_t grid);

// out = alpha * a @ b, or out += alpha * a @ b (accumulate): every matrix product of the CPU MMD kernels goes
// through here (a and b may be transposed views; out may be a strided row block of a gradient).
void tile_product(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float alpha, bool accumulate);

// Fills the tile's slices with the dot products of a's rows against b's columns.
void dot_tiles(const at::Tensor& a, const at::Tensor& b, const SliceLayout& layout, const Tile& tile,
               const TilePlane& plane);

// The gradient of one side (the samples x = z, or the shuffled samples y) in GEMM form: for the weights W of a tile,
// its rows n get scale * (sum_m W(n, m) a_n - sum_m W(n, m) b_m) (b: the other side's samples of the columns), and,
// for a term's column side, its columns m get scale * (sum_n W(n, m) a_m - sum_n W(n, m) b_n). The products
// accumulate tile by tile; the weight sums into `weight_sums`, applied once by finish(). With `perms` (the side of
// y[m, k] = z[perms[k, m], k]) every update goes through the permutations into z's gradient in chunks of bounded
// size, so y's gradient is never stored (the memory target counts it); without, in place into grad's rows.
class GradientSide {
 public:
  GradientSide(const at::Tensor& samples, const SliceLayout& layout, at::Tensor grad, at::Tensor perms);
  // rows of the tile: += scale * (rowsum(W) * samples[rows] - W @ other[cols]), W = the tile (slice by slice).
  // With sum_weights false the caller has added scale * rowsum(W) to weight_sums() itself (in its weight pass).
  void add_rows(const TilePlane& plane, const Tile& tile, const at::Tensor& other, double scale,
                bool sum_weights = true);
  // columns of the tile: += scale * (colsum(W) * samples[cols] - W^T @ other[rows]); sum_weights as in add_rows
  void add_columns(const TilePlane& plane, const Tile& tile, const at::Tensor& other, double scale,
                   bool sum_weights = true);
  // adds weight_sums * samples
  void finish();
  // float64 [S, N], contiguous: the weight sums finish() applies
  double* weight_sums() { return weight_sums_.data_ptr<double>(); }

 private:
  // rows [row0, row0 + a.size(0)) of slice s += alpha * a @ b
  void add_product(int64_t s, int64_t row0, const at::Tensor& a, const at::Tensor& b, float alpha);
  // rows [row0, row0 + update.size(0)) of slice s += update, through perms
  void scatter(int64_t s, int64_t row0, const at::Tensor& update);

  at::Tensor samples_;
  const SliceLayout& layout_;
  at::Tensor grad_;         // [N, K, D] float32: the gradient of z
  at::Tensor perms_;        // [K, N] int64, or undefined
  at::Tensor weight_sums_;  // [S, N] float64
  int64_t chunk_rows_;      // rows per update through perms
};

}  // namespace mmd
}  // namespace mmdkernels
