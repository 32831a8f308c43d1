// Definitions of the CPU tile machinery declared in tiles_cpu.h.
#include "mmd/tiles_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "gemm/gemm.h"
#include "mmd/chain_fixed.h"

namespace mmdkernels {
namespace mmd {
namespace {

// out[m] = base[m]^P for a compile-time P: one vectorised pass over the chunk.
template <int P>
void power_chunk_fixed(const float* base, float* out, int64_t len) {
#pragma omp simd
  for (int64_t m = 0; m < len; ++m) out[m] = unrolled_power<P>(1.0f, base[m]);
}

// out[m] = base[m]^step: the multiplications of int_power in the same order, vectorised over m. Steps up to 16 (the
// default plan's are 2, 5 and 10) take one pass; larger ones go bit by bit.
void power_chunk(const float* base, int step, float* out, int64_t len) {
  using Power = void (*)(const float*, float*, int64_t);
  static constexpr Power kFixed[] = {
      nullptr,                  power_chunk_fixed<1>,  power_chunk_fixed<2>,  power_chunk_fixed<3>,
      power_chunk_fixed<4>,     power_chunk_fixed<5>,  power_chunk_fixed<6>,  power_chunk_fixed<7>,
      power_chunk_fixed<8>,     power_chunk_fixed<9>,  power_chunk_fixed<10>, power_chunk_fixed<11>,
      power_chunk_fixed<12>,    power_chunk_fixed<13>, power_chunk_fixed<14>, power_chunk_fixed<15>,
      power_chunk_fixed<16>};
  if (step < static_cast<int>(sizeof(kFixed) / sizeof(kFixed[0]))) return kFixed[step](base, out, len);
  float square[kChunk];
  for (int64_t m = 0; m < len; ++m) {
    square[m] = base[m];
    out[m] = 1.0f;
  }
  while (step > 0) {
    if (step & 1) {
#pragma omp simd
      for (int64_t m = 0; m < len; ++m) out[m] *= square[m];
    }
#pragma omp simd
    for (int64_t m = 0; m < len; ++m) square[m] *= square[m];
    step >>= 1;
  }
}


// sums[i] += scale * sum_j w[i, j] (w: [rows, cols] contiguous), in double: at::sum with a double result would first
// copy the whole tile to double (8 MiB at 256 x 4096), which the memory targets count.
void add_row_sums(const float* w, int64_t rows, int64_t cols, double scale, double* sums) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) sums[i] += scale * sum_chunk(w + i * cols, cols);
  });
}

// sums[j] += scale * sum_i w[i, j], in double, columns split among threads.
void add_column_sums(const float* w, int64_t rows, int64_t cols, double scale, double* sums) {
  at::parallel_for(0, cols, 256, [&](int64_t begin, int64_t end) {
    double acc[kChunk];
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t len = std::min(kChunk, end - c0);
      std::fill(acc, acc + len, 0.0);
      for (int64_t i = 0; i < rows; ++i) {
        const float* v = w + i * cols + c0;
#pragma omp simd
        for (int64_t m = 0; m < len; ++m) acc[m] += v[m];
      }
      for (int64_t m = 0; m < len; ++m) sums[c0 + m] += scale * acc[m];
    }
  });
}
}  // namespace

void bandwidths_chunk(const float* dist, const BandwidthPlan& plan, float (*e)[kChunk], int64_t len) {
  float base[kChunk];
  if (plan.base_coef > 0.0f) {
#pragma omp simd
    for (int64_t m = 0; m < len; ++m) base[m] = fast_exp(-plan.base_coef * dist[m]);
  }
  for (int j = 0; j < plan.count; ++j) {
    if (plan.src[j] == kDirectExp) {
      const float coef = plan.coef[j];
#pragma omp simd
      for (int64_t m = 0; m < len; ++m) e[j][m] = fast_exp(-coef * dist[m]);
    } else {
      power_chunk(plan.src[j] == kFromBase ? base : e[plan.src[j]], plan.step[j], e[j], len);
    }
  }
}

void refine_near_duplicates(float* dist, const float* row_a, float norm_a, const float* rows_b, const float* norms_b,
                            int64_t stride, int64_t width, int64_t len) {
  int flagged = 0;
#pragma omp simd reduction(+ : flagged)
  for (int64_t m = 0; m < len; ++m) flagged += dist[m] <= kNearDuplicate * (norm_a + norms_b[m]) ? 1 : 0;
  if (flagged == 0) return;
  for (int64_t m = 0; m < len; ++m) {
    if (dist[m] > kNearDuplicate * (norm_a + norms_b[m])) continue;
    const float* row_b = rows_b + m * stride;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < width; ++i) {
      const float diff = row_a[i] - row_b[i];
      sum += diff * diff;
    }
    dist[m] = sum;
  }
}

SliceLayout make_layout(const at::Tensor& groups, int64_t num_codebooks, int64_t dim, bool allow_joint_slice) {
  const auto g = groups.contiguous();
  const int64_t num_groups = g.size(0);
  const int* mask = g.data_ptr<int>();
  SliceLayout layout{num_codebooks, dim, {}};
  for (int64_t row = 0; row < num_groups; ++row) {
    std::vector<int> members;
    for (int64_t k = 0; k < num_codebooks; ++k) {
      TORCH_CHECK(mask[row * num_codebooks + k] == 0 || mask[row * num_codebooks + k] == 1,
                  "groups must be a 0/1 mask, got ", mask[row * num_codebooks + k]);
      if (mask[row * num_codebooks + k]) members.push_back(static_cast<int>(k));
    }
    TORCH_CHECK(!members.empty(), "groups row ", row, " selects no codebook");
    layout.group_members.push_back(members);
  }
  const bool single_full_group =
      num_groups == 1 && static_cast<int64_t>(layout.group_members[0].size()) == num_codebooks;
  if (allow_joint_slice && single_full_group) layout = {1, num_codebooks * dim, {{0}}};
  return layout;
}

at::Tensor slice_of(const at::Tensor& samples, const SliceLayout& layout, int64_t s) {
  return samples.view({samples.size(0), layout.num_slices, layout.width}).select(1, s);
}

at::Tensor slice_norms(const at::Tensor& samples, const SliceLayout& layout) {
  const int64_t n = samples.size(0), num_slices = layout.num_slices, width = layout.width;
  auto norms = at::empty({num_slices, n}, samples.options());
  const float* data = samples.data_ptr<float>();
  float* out = norms.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t s = 0; s < num_slices; ++s) {
        const float* v = data + (row * num_slices + s) * width;
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < width; ++i) sum += v[i] * v[i];
        out[s * n + row] = static_cast<float>(sum);
      }
    }
  });
  return norms;
}

TilePlane::TilePlane(int64_t n, int64_t num_slices, const at::TensorOptions& options, int64_t budget_floats) : n_(n) {
  row_block_ = std::min<int64_t>(n, 256);
  col_block_ = std::min<int64_t>(n, std::max<int64_t>(kChunk, budget_floats / (num_slices * row_block_)));
  tile_floats_ = row_block_ * col_block_;
  buffer_ = at::empty({num_slices * tile_floats_}, options);
  data_ = buffer_.data_ptr<float>();
}

std::vector<Tile> TilePlane::tiles(int64_t row_begin, int64_t row_end) const {
  if (row_end < 0) row_end = n_;
  std::vector<Tile> out;
  for (int64_t row0 = row_begin; row0 < row_end; row0 += row_block_) {
    for (int64_t col0 = 0; col0 < n_; col0 += col_block_) {
      out.push_back({row0, std::min(row_block_, row_end - row0), col0, std::min(col_block_, n_ - col0)});
    }
  }
  return out;
}

std::vector<Tile> TilePlane::symmetric_tiles(int64_t row_begin, int64_t row_end) const {
  if (row_end < 0) row_end = n_;
  const int64_t block = row_block_, num_blocks = (n_ + block - 1) / block;
  std::vector<Tile> out;
  for (int64_t r = row_begin / block; r * block < row_end; ++r) {
    const int64_t row0 = std::max(row_begin, r * block), rows = std::min({row_end, (r + 1) * block, n_}) - row0;
    if (rows <= 0) continue;
    out.push_back({row0, rows, r * block, std::min((r + 1) * block, n_) - r * block, true, false});
    const int64_t owned = (num_blocks - 1) / 2 + (num_blocks % 2 == 0 && r < num_blocks / 2 ? 1 : 0);
    // the owned column blocks r+1 .. r+owned as at most two contiguous column ranges (the second wraps to 0)
    const int64_t first_end = std::min(r + 1 + owned, num_blocks);
    const int64_t ranges[2][2] = {{r + 1, first_end}, {0, r + 1 + owned - first_end}};
    for (const auto& range : ranges) {
      const int64_t col_begin = range[0] * block, col_end = std::min(range[1] * block, n_);
      for (int64_t col0 = col_begin; col0 < col_end; col0 += col_block_) {
        out.push_back({row0, rows, col0, std::min(col_block_, col_end - col0), false, true});
      }
    }
  }
  return out;
}

std::vector<std::vector<Tile>> disjoint_rounds(const std::vector<Tile>& tiles, int64_t grid) {
  TORCH_CHECK(grid > 0, "disjoint_rounds: grid must be positive, got ", grid);
  int64_t cells = 0;
  for (const Tile& t : tiles) cells = std::max({cells, t.row0 + t.rows, t.col0 + t.cols});
  cells = (cells + grid - 1) / grid;
  std::vector<std::vector<Tile>> rounds;
  std::vector<Tile> remaining = tiles, left;
  std::vector<char> used(cells);
  while (!remaining.empty()) {
    std::fill(used.begin(), used.end(), 0);
    std::vector<Tile> round;
    left.clear();
    for (const Tile& t : remaining) {
      const int64_t ranges[2][2] = {{t.row0, t.rows}, {t.col0, t.mirrored ? t.cols : 0}};
      bool free = true;
      for (const auto& r : ranges) {
        for (int64_t c = r[0] / grid; r[1] > 0 && c <= (r[0] + r[1] - 1) / grid; ++c) free = free && !used[c];
      }
      if (!free) {
        left.push_back(t);
        continue;
      }
      for (const auto& r : ranges) {
        for (int64_t c = r[0] / grid; r[1] > 0 && c <= (r[0] + r[1] - 1) / grid; ++c) used[c] = 1;
      }
      round.push_back(t);
    }
    rounds.push_back(std::move(round));
    remaining.swap(left);
  }
  return rounds;
}

at::Tensor TilePlane::slice(int64_t s, const Tile& tile) const {
  return buffer_.narrow(0, s * tile_floats_, tile.rows * tile.cols).view({tile.rows, tile.cols});
}

void tile_product(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float alpha, bool accumulate) {
  if (!accumulate) {
    gemm::multiply_into(out, a, b);
    if (alpha != 1.0f) out.mul_(alpha);
    return;
  }
  gemm::accumulate_into(out, a, b, alpha);
}

void dot_tiles(const at::Tensor& a, const at::Tensor& b, const SliceLayout& layout, const Tile& tile,
               const TilePlane& plane) {
  for (int64_t s = 0; s < layout.num_slices; ++s) {
    tile_product(plane.slice(s, tile), slice_of(a, layout, s).narrow(0, tile.row0, tile.rows),
                 slice_of(b, layout, s).narrow(0, tile.col0, tile.cols).t(), 1.0f, /*accumulate=*/false);
  }
}

GradientSide::GradientSide(const at::Tensor& samples, const SliceLayout& layout, at::Tensor grad, at::Tensor perms)
    : samples_(samples),
      layout_(layout),
      grad_(std::move(grad)),
      perms_(perms.defined() ? perms.contiguous() : perms),
      weight_sums_(at::zeros({layout.num_slices, samples.size(0)}, samples.options().dtype(at::kDouble))),
      chunk_rows_(std::max<int64_t>(1, kTileBudgetFloats / 4 / layout.width)) {}

void GradientSide::scatter(int64_t s, int64_t row0, const at::Tensor& update) {
  // A loop of our own, not index_add_: that one adds row by row through tensor calls (22 % of the shuffle's time in a
  // profile). Feature columns go to threads, so a column's rows are added by one thread in order: deterministic,
  // and race-free even if a permutation repeated an index.
  const int64_t rows = update.size(0), width = layout_.width, n = grad_.size(0);
  const int64_t dim = grad_.size(2), row_stride = grad_.size(1) * dim, first = s * width;
  const auto contiguous_update = update.contiguous();
  const float* src = contiguous_update.data_ptr<float>();
  const int64_t* perm = perms_.data_ptr<int64_t>();
  float* dst = grad_.data_ptr<float>();
  at::parallel_for(0, width, 64, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t m = 0; m < rows; ++m) {
      const float* u = src + m * width;
      for (int64_t c0 = c_begin; c0 < c_end;) {  // the columns of one codebook at a time
        const int64_t k = (first + c0) / dim, c1 = std::min(c_end, (k + 1) * dim - first);
        float* out = dst + perm[k * n + row0 + m] * row_stride + first;
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) out[c] += u[c];
        c0 = c1;
      }
    }
  });
}

void GradientSide::add_product(int64_t s, int64_t row0, const at::Tensor& a, const at::Tensor& b, float alpha) {
  if (!perms_.defined()) {
    tile_product(slice_of(grad_, layout_, s).narrow(0, row0, a.size(0)), a, b, alpha, /*accumulate=*/true);
    return;
  }
  for (int64_t r0 = 0; r0 < a.size(0); r0 += chunk_rows_) {
    const int64_t rows = std::min(chunk_rows_, a.size(0) - r0);
    const auto update = at::empty({rows, b.size(1)}, grad_.options());
    tile_product(update, a.narrow(0, r0, rows), b, alpha, /*accumulate=*/false);
    scatter(s, row0 + r0, update);
  }
}

void GradientSide::add_rows(const TilePlane& plane, const Tile& tile, const at::Tensor& other, double scale,
                            bool sum_weights) {
  for (int64_t s = 0; s < layout_.num_slices; ++s) {
    const auto weights = plane.slice(s, tile);
    if (sum_weights) {
      double* sums = weight_sums() + s * samples_.size(0) + tile.row0;
      add_row_sums(plane.row(s, tile, 0), tile.rows, tile.cols, scale, sums);
    }
    add_product(s, tile.row0, weights, slice_of(other, layout_, s).narrow(0, tile.col0, tile.cols),
                static_cast<float>(-scale));
  }
}

void GradientSide::add_columns(const TilePlane& plane, const Tile& tile, const at::Tensor& other, double scale,
                               bool sum_weights) {
  for (int64_t s = 0; s < layout_.num_slices; ++s) {
    const auto weights = plane.slice(s, tile);
    if (sum_weights) {
      double* sums = weight_sums() + s * samples_.size(0) + tile.col0;
      add_column_sums(plane.row(s, tile, 0), tile.rows, tile.cols, scale, sums);
    }
    add_product(s, tile.col0, weights.t(), slice_of(other, layout_, s).narrow(0, tile.row0, tile.rows),
                static_cast<float>(-scale));
  }
}

void GradientSide::finish() {
  const int64_t n = samples_.size(0);
  for (int64_t s = 0; s < layout_.num_slices; ++s) {
    const auto sums = weight_sums_[s].to(at::kFloat).unsqueeze(1);
    if (!perms_.defined()) {
      slice_of(grad_, layout_, s).addcmul_(sums, slice_of(samples_, layout_, s));
      continue;
    }
    for (int64_t r0 = 0; r0 < n; r0 += chunk_rows_) {
      const int64_t rows = std::min(chunk_rows_, n - r0);
      scatter(s, r0, slice_of(samples_, layout_, s).narrow(0, r0, rows) * sums.narrow(0, r0, rows));
    }
  }
}

}  // namespace mmd
}  // namespace mmdkernels
