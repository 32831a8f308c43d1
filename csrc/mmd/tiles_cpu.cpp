// Definitions of the CPU tile machinery declared in tiles_cpu.h.
#include "mmd/tiles_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "gemm/gemm.h"

namespace mmdkernels {
namespace mmd {
namespace {

// out[m] = base[m]^step: the multiplications of int_power (mmd_tile.h) in the same order, vectorised over m.
void power_chunk(const float* base, int step, float* out, int64_t len) {
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

TilePlane::TilePlane(int64_t n, int64_t num_slices, const at::TensorOptions& options) : n_(n) {
  row_block_ = std::min<int64_t>(n, 256);
  col_block_ = std::min<int64_t>(n, std::max<int64_t>(kChunk, kTileBudgetFloats / (num_slices * row_block_)));
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

at::Tensor TilePlane::slice(int64_t s, const Tile& tile) const {
  return buffer_.narrow(0, s * tile_floats_, tile.rows * tile.cols).view({tile.rows, tile.cols});
}

void dot_tiles(const at::Tensor& a, const at::Tensor& b, const SliceLayout& layout, const Tile& tile,
               const TilePlane& plane) {
  for (int64_t s = 0; s < layout.num_slices; ++s) {
    auto out = plane.slice(s, tile);
    gemm::multiply_into(out, slice_of(a, layout, s).narrow(0, tile.row0, tile.rows),
                        slice_of(b, layout, s).narrow(0, tile.col0, tile.cols).t());
  }
}

void GradientSink::add(const SliceLayout& layout, int64_t s, int64_t row0, const at::Tensor& update) const {
  const int64_t rows = update.size(0);
  if (!perms.defined()) {
    slice_of(grad, layout, s).narrow(0, row0, rows).add_(update);
    return;
  }
  if (layout.num_slices == 1) {  // one slice spans every codebook, each permuted on its own
    const int64_t num_codebooks = grad.size(1);
    const auto per_codebook = update.view({rows, num_codebooks, grad.size(2)});
    for (int64_t k = 0; k < num_codebooks; ++k) {
      grad.select(1, k).index_add_(0, perms[k].narrow(0, row0, rows), per_codebook.select(1, k));
    }
  } else {
    grad.select(1, s).index_add_(0, perms[s].narrow(0, row0, rows), update);
  }
}

void add_row_gradient(const TilePlane& plane, const Tile& tile, const at::Tensor& a, const at::Tensor& b,
                      const SliceLayout& layout, double scale, const GradientSink& sink_a) {
  for (int64_t s = 0; s < layout.num_slices; ++s) {
    const auto weights = plane.slice(s, tile);
    auto update = gemm::product(weights, slice_of(b, layout, s).narrow(0, tile.col0, tile.cols));
    update.mul_(-scale).addcmul_(weights.sum(1, true), slice_of(a, layout, s).narrow(0, tile.row0, tile.rows), scale);
    sink_a.add(layout, s, tile.row0, update);
  }
}

void add_column_gradient(const TilePlane& plane, const Tile& tile, const at::Tensor& a, const at::Tensor& b,
                         const SliceLayout& layout, double scale, const GradientSink& sink_b) {
  // in column chunks, so the [cols, width] update stays small (the memory target counts it)
  const int64_t cols_per_chunk = std::max<int64_t>(1, kTileBudgetFloats / 4 / layout.width);
  for (int64_t s = 0; s < layout.num_slices; ++s) {
    const auto weights = plane.slice(s, tile);
    const auto a_rows = slice_of(a, layout, s).narrow(0, tile.row0, tile.rows);
    for (int64_t c0 = 0; c0 < tile.cols; c0 += cols_per_chunk) {
      const int64_t cols = std::min(cols_per_chunk, tile.cols - c0);
      const auto w = weights.narrow(1, c0, cols);
      auto update = gemm::product(w.t(), a_rows);
      update.mul_(-scale).addcmul_(w.sum(0).unsqueeze(1), slice_of(b, layout, s).narrow(0, tile.col0 + c0, cols),
                                   scale);
      sink_b.add(layout, s, tile.col0 + c0, update);
    }
  }
}

}  // namespace mmd
}  // namespace mmdkernels
