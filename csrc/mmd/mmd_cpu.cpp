// Fused multi-kernel MMD loss on the CPU: shuffle estimator and dHSIC, loss and gradient in one pass over tiles.
// Tiling: (row block x column block) tiles sized to a 4 MiB budget (TilePlane); the distance tile of each
// feature slice comes from one GEMM (tile_product), then a vectorised pass per row (at::parallel_for) turns dot
// products into distances, applies every bandwidth through the plan's chain (one exp per entry), and overwrites the
// tile in place with the gradient weights W. A second GEMM per slice (W @ B, and W^T @ A for a column side)
// accumulates the weights into the gradient. The symmetric xx and yy terms visit each pair of row blocks once.
// The N x N matrices are never stored; sums accumulate in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "mmd/chain_fixed.h"
#include "mmd/tiles_cpu.h"

namespace mmdkernels {
namespace mmd {
namespace {

// One term (xx, yy or xy) of the shuffle estimator over the rows [row_begin, row_end) of a and the columns of b:
// returns its weighted sum; adds its gradient to the sides. A symmetric term (b = a) computes each pair of row
// blocks once (TilePlane::symmetric_tiles): a mirrored tile's entries count twice and its gradient goes to its rows
// and its columns (factor 4 each: both orders of the pair, d(d(a, b))/da = 2 (a - b)); a diagonal tile holds both
// triangles, so its row side (factor 4) is its whole gradient. The xy term takes full rows, its row side to a and
// its column side to b (factor 2 each).
double shuffle_term(const at::Tensor& a, const at::Tensor& b, bool symmetric, const SliceLayout& layout,
                    const BandwidthPlan& plan, float weight, bool compute_grad, GradientSide* side_a,
                    GradientSide* side_b, int64_t row_begin, int64_t row_end) {
  const int64_t n = a.size(0);
  const int64_t num_slices = layout.num_slices;
  const auto norms_a = slice_norms(a, layout);
  const auto norms_b = symmetric ? norms_a : slice_norms(b, layout);
  const float* na = norms_a.data_ptr<float>();
  const float* nb = norms_b.data_ptr<float>();
  const TilePlane plane(n, num_slices, a.options());
  std::vector<double> row_sums(n, 0.0);
  const float* a_data = a.data_ptr<float>();
  const float* b_data = b.data_ptr<float>();
  const int64_t width = layout.width, stride = num_slices * width;
  const bool fixed_chain = use_fixed_chain(plan);
  float neg_coefs[kMaxBandwidths];
  for (int j = 0; j < plan.count; ++j) neg_coefs[j] = -plan.coef[j];

  for (const Tile& tile : symmetric ? plane.symmetric_tiles(row_begin, row_end) : plane.tiles(row_begin, row_end)) {
    dot_tiles(a, b, layout, tile, plane);
    const double multiplicity = tile.mirrored ? 2.0 : 1.0;
    at::parallel_for(0, tile.rows, 1, [&](int64_t begin, int64_t end) {
      const FlushDenormals flush_denormals;
      std::vector<float> scratch((2 * num_slices + 2 + kMaxBandwidths) * kChunk);
      float* dist = scratch.data();                         // [S][kChunk]
      float* slice_weights = dist + num_slices * kChunk;    // [S][kChunk]: W of each slice
      float* group_weights = slice_weights + num_slices * kChunk;  // [kChunk]: slope of the current group
      float* group_dist = group_weights + kChunk;                  // [kChunk]
      auto* e = reinterpret_cast<float(*)[kChunk]>(group_dist + kChunk);
      // value[m] += sum_j e_j(d[m]) and group_weights[m] = -sum_j coef_j e_j(d[m]) by the plan's chunk loops
      const auto plan_value_and_slope = [&](const float* d, float* value, int64_t len) {
        bandwidths_chunk(d, plan, e, len);
        std::fill(group_weights, group_weights + len, 0.0f);
        for (int j = 0; j < plan.count; ++j) {
#pragma omp simd
          for (int64_t m = 0; m < len; ++m) {
            value[m] += e[j][m];
            group_weights[m] += neg_coefs[j] * e[j][m];
          }
        }
      };
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = tile.row0 + i;
        double row_sum = 0.0;
        for (int64_t c0 = 0; c0 < tile.cols; c0 += kChunk) {
          const int64_t len = std::min(kChunk, tile.cols - c0);
          const int64_t col0 = tile.col0 + c0;
          for (int64_t s = 0; s < num_slices; ++s) {
            const float* dots = plane.row(s, tile, i) + c0;
            const float na_s = na[s * n + row];
            const float* nb_s = nb + s * n + col0;
            float* d = dist + s * kChunk;
#pragma omp simd
            for (int64_t m = 0; m < len; ++m) d[m] = sqdist_from_dot(na_s, nb_s[m], dots[m]);
            refine_near_duplicates(d, a_data + row * stride + s * width, na_s, b_data + col0 * stride + s * width,
                                   nb_s, stride, width, len);
          }
          std::fill(slice_weights, slice_weights + num_slices * kChunk, 0.0f);
          float chunk_value[kChunk] = {};
          for (const auto& members : layout.group_members) {
            std::copy(dist + members[0] * kChunk, dist + members[0] * kChunk + len, group_dist);
            for (size_t t = 1; t < members.size(); ++t) {
              const float* d = dist + members[t] * kChunk;
#pragma omp simd
              for (int64_t m = 0; m < len; ++m) group_dist[m] += d[m];
            }
            if (fixed_chain) {
              ChainLoops<DefaultChain>::slope<true>(group_dist, plan.base_coef, neg_coefs, group_weights, chunk_value,
                                                    len);
            } else {
              plan_value_and_slope(group_dist, chunk_value, len);
            }
            for (int member : members) {
              float* w = slice_weights + member * kChunk;
#pragma omp simd
              for (int64_t m = 0; m < len; ++m) w[m] += weight * group_weights[m];
            }
          }
          const int64_t diagonal = row - col0;
          if (tile.diagonal && diagonal >= 0 && diagonal < len) {  // n == m: excluded from the xx and yy sums
            chunk_value[diagonal] = 0.0f;
            for (int64_t s = 0; s < num_slices; ++s) slice_weights[s * kChunk + diagonal] = 0.0f;
          }
          row_sum += sum_chunk(chunk_value, len);
          if (compute_grad) {
            for (int64_t s = 0; s < num_slices; ++s) {
              const float* d = dist + s * kChunk;
              const float* w = slice_weights + s * kChunk;
              float* out = plane.row(s, tile, i) + c0;
#pragma omp simd
              for (int64_t m = 0; m < len; ++m) out[m] = d[m] == 0.0f ? 0.0f : w[m];  // duplicates: a - b = 0
            }
          }
        }
        row_sums[row] += multiplicity * row_sum;
      }
    });
    if (compute_grad) {
      const double scale = symmetric ? 4.0 : 2.0;
      side_a->add_rows(plane, tile, b, scale);
      if (!symmetric || tile.mirrored) side_b->add_columns(plane, tile, a, scale);
    }
  }
  double total = 0.0;
  for (double v : row_sums) total += v;
  return static_cast<double>(weight) * total;
}

// The shuffle sums over the rows [row_begin, row_end): (loss float64 [], grad float32 [N, K, D] or [0]).
std::tuple<at::Tensor, at::Tensor> mmd_shuffle_rows_cpu(const at::Tensor& z, const at::Tensor& perms,
                                                        const at::Tensor& groups, c10::ArrayRef<double> coefs,
                                                        c10::ArrayRef<int64_t> chain_src,
                                                        c10::ArrayRef<int64_t> chain_step, double chain_base,
                                                        c10::ArrayRef<double> term_weights, int64_t row_begin,
                                                        int64_t row_end, bool compute_grad) {
  const auto checked = check_shuffle_args(c10::DeviceType::CPU, z, perms, groups, coefs, chain_src, chain_step,
                                          chain_base, term_weights, row_begin, row_end);
  const int64_t n = z.size(0), num_codebooks = z.size(1), dim = z.size(2);
  row_end = checked.row_end;
  const BandwidthPlan& plan = checked.plan;
  const auto layout = make_layout(groups, num_codebooks, dim, /*allow_joint_slice=*/true);
  TORCH_CHECK(perms.min().item<int64_t>() >= 0 && perms.max().item<int64_t>() < n,
              "perms must hold indices in [0, ", n, ")");

  // y[:, k] = z[perms[k], k]: the product-of-marginals samples, O(N K D) memory.
  auto y = at::empty_like(z);
  for (int64_t k = 0; k < num_codebooks; ++k) {
    y.select(1, k).copy_(z.select(1, k).index_select(0, perms[k]));
  }
  // the gradient of x = z in place, that of y through perms into it
  auto grad = compute_grad ? at::zeros_like(z) : at::empty({0}, z.options());
  GradientSide side_x(z, layout, grad, at::Tensor());
  GradientSide side_y(y, layout, grad, perms);
  const float w_xx = static_cast<float>(term_weights[0]);
  const float w_yy = static_cast<float>(term_weights[1]);
  const float w_xy = static_cast<float>(term_weights[2]);
  double loss = shuffle_term(z, z, true, layout, plan, w_xx, compute_grad, &side_x, &side_x, row_begin, row_end);
  loss += shuffle_term(y, y, true, layout, plan, w_yy, compute_grad, &side_y, &side_y, row_begin, row_end);
  loss += shuffle_term(z, y, false, layout, plan, w_xy, compute_grad, &side_x, &side_y, row_begin, row_end);
  const auto loss_tensor = at::scalar_tensor(loss, z.options().dtype(at::kDouble));
  if (compute_grad) {
    side_x.finish();
    side_y.finish();
  }
  return {loss_tensor, grad};
}

std::tuple<at::Tensor, at::Tensor> mmd_shuffle_cpu(const at::Tensor& z, const at::Tensor& perms,
                                                   const at::Tensor& groups, c10::ArrayRef<double> coefs,
                                                   c10::ArrayRef<int64_t> chain_src, c10::ArrayRef<int64_t> chain_step,
                                                   double chain_base, c10::ArrayRef<double> term_weights,
                                                   bool compute_grad) {
  auto [loss, grad] = mmd_shuffle_rows_cpu(z, perms, groups, coefs, chain_src, chain_step, chain_base, term_weights,
                                           0, -1, compute_grad);
  return {loss.to(at::kFloat), grad};
}

at::Tensor bandwidth_chain_eval_cpu(const at::Tensor& d, c10::ArrayRef<double> coefs, c10::ArrayRef<int64_t> chain_src,
                                    c10::ArrayRef<int64_t> chain_step, double chain_base) {
  MMD_CHECK_DEVICE(d, at::Device(at::kCPU));
  MMD_CHECK_DTYPE(d, at::kFloat);
  MMD_CHECK_DIM(d, 1);
  const auto plan = make_plan(coefs, chain_src, chain_step, chain_base);
  const auto dc = d.contiguous();
  auto out = at::empty({d.size(0), plan.count}, d.options());
  const float* in = dc.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t m = 0; m < d.size(0); ++m) eval_bandwidths(in[m], plan, o + m * plan.count);
  return out;
}

}  // namespace
}  // namespace mmd
}  // namespace mmdkernels

TORCH_LIBRARY_IMPL(mmdkernels, CPU, m) {
  m.impl("mmd_shuffle", &mmdkernels::mmd::mmd_shuffle_cpu);
  m.impl("mmd_shuffle_rows", &mmdkernels::mmd::mmd_shuffle_rows_cpu);
  m.impl("bandwidth_chain_eval", &mmdkernels::mmd::bandwidth_chain_eval_cpu);
}
