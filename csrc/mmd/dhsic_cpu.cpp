// dHSIC V-statistic of codebook groups on the CPU: the shuffle-free estimator of the same MMD, loss and gradient.
// Two passes over tiles of per-codebook distances (one GEMM per codebook and tile, 4 MiB tile budget; the Grams are
// symmetric, so each pair of row blocks is visited once and a mirrored tile also feeds its columns):
// pass 1 reduces each Gram matrix E_{k,j} to row sums and each group's product of Grams to a sum; the loss follows
// from those O(K A N) numbers (dhsic_statistics in dhsic_stats.h, shared with CUDA). Pass 2 (only for the gradient)
// recomputes the tiles, overwrites them with the symmetrised weights W_k (dhsic_entry_weight in mmd_tile.h) and adds
// 2 (rowsum(W_k) z^k - W_k @ z^k) per codebook (and the transposed column side of a mirrored tile).
// Nothing N x N is stored; sums accumulate in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "mmd/dhsic_stats.h"
#include "mmd/tiles_cpu.h"

namespace mmdkernels {
namespace mmd {
namespace {

// Per-thread scratch for one chunk of a row: per-codebook distances and Grams for every bandwidth.
struct DhsicChunk {
  int64_t num_codebooks;
  std::vector<float> dist;                 // [K][kChunk]
  std::vector<float> grams;                // [K][kMaxBandwidths][kChunk]
  std::vector<float> product;              // [kChunk]
  explicit DhsicChunk(int64_t k)
      : num_codebooks(k), dist(k * kChunk), grams(k * kMaxBandwidths * kChunk), product(kChunk) {}
  float* gram(int64_t k, int j) { return grams.data() + (k * kMaxBandwidths + j) * kChunk; }

  // Distances of the tile's row i (global `row`) against columns [col0, col0 + len) (c0 within the tile),
  // diagonal exactly 0, and the Grams E_{k,j} of every codebook and bandwidth.
  void load(const TilePlane& plane, const Tile& tile, const at::Tensor& z, const float* norms, int64_t n, int64_t i,
            int64_t row, int64_t c0, int64_t col0, int64_t len, const BandwidthPlan& plan) {
    const float* z_data = z.data_ptr<float>();
    const int64_t width = z.size(2), stride = num_codebooks * width;
    for (int64_t k = 0; k < num_codebooks; ++k) {
      const float* dots = plane.row(k, tile, i) + c0;
      const float norm_row = norms[k * n + row];
      const float* norm_cols = norms + k * n + col0;
      float* d = dist.data() + k * kChunk;
#pragma omp simd
      for (int64_t m = 0; m < len; ++m) d[m] = sqdist_from_dot(norm_row, norm_cols[m], dots[m]);
      refine_near_duplicates(d, z_data + row * stride + k * width, norm_row, z_data + col0 * stride + k * width,
                             norm_cols, stride, width, len);
      if (row >= col0 && row < col0 + len) d[row - col0] = 0.0f;
      bandwidths_chunk(d, plan, reinterpret_cast<float(*)[kChunk]>(gram(k, 0)), len);
    }
  }

  // product[m] = prod_{k in members} E_{k,j}[m]
  void group_product(const std::vector<int>& members, int j, int64_t len) {
    std::copy(gram(members[0], j), gram(members[0], j) + len, product.begin());
    for (size_t t = 1; t < members.size(); ++t) {
      const float* g = gram(members[t], j);
#pragma omp simd
      for (int64_t m = 0; m < len; ++m) product[m] *= g[m];
    }
  }
};

// Pass 1 over the pairs owned by the rows [row_begin, row_end) (TilePlane::symmetric_tiles: every E_{k,j} is
// symmetric): float64 [K*A + 1, N], row k*A + j = sum_m E_{k,j}(n, m) over those pairs, added to the row n and, for a
// mirrored tile, to the column m too; the last row's total = sum over groups, bandwidths and those pairs (mirrored
// ones twice) of the joint Gram. Summed over a partition of the rows into ranges: the full sums.
at::Tensor dhsic_sums(const at::Tensor& z, const SliceLayout& layout, const BandwidthPlan& plan, int64_t row_begin,
                      int64_t row_end) {
  const int64_t n = z.size(0), num_codebooks = z.size(1);
  const int num_bw = plan.count;
  const int64_t num_kj = num_codebooks * num_bw;
  const auto norms = slice_norms(z, layout);
  const float* norm_data = norms.data_ptr<float>();
  const TilePlane plane(n, num_codebooks, z.options());
  auto sums = at::zeros({num_kj + 1, n}, z.options().dtype(at::kDouble));
  double* row_sums = sums.data_ptr<double>();
  double* joint_row_sums = row_sums + num_kj * n;
  std::mutex column_mutex;
  for (const Tile& tile : plane.symmetric_tiles(row_begin, row_end)) {
    dot_tiles(z, z, layout, tile, plane);
    const double multiplicity = tile.mirrored ? 2.0 : 1.0;
    at::parallel_for(0, tile.rows, 1, [&](int64_t begin, int64_t end) {
      const FlushDenormals flush_denormals;
      DhsicChunk chunk(num_codebooks);
      std::vector<double> gram_sums(num_kj);
      // a mirrored tile's column sums over this thread's rows, [K*A][cols]
      std::vector<double> column_sums(tile.mirrored ? num_kj * tile.cols : 0, 0.0);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = tile.row0 + i;
        std::fill(gram_sums.begin(), gram_sums.end(), 0.0);
        double joint_sum = 0.0;
        for (int64_t c0 = 0; c0 < tile.cols; c0 += kChunk) {
          const int64_t len = std::min(kChunk, tile.cols - c0);
          chunk.load(plane, tile, z, norm_data, n, i, row, c0, tile.col0 + c0, len, plan);
          for (int64_t k = 0; k < num_codebooks; ++k) {
            for (int j = 0; j < num_bw; ++j) {
              const float* g = chunk.gram(k, j);
              gram_sums[k * num_bw + j] += sum_chunk(g, len);
              if (tile.mirrored) {
                double* col = column_sums.data() + (k * num_bw + j) * tile.cols + c0;
#pragma omp simd
                for (int64_t m = 0; m < len; ++m) col[m] += g[m];
              }
            }
          }
          for (const auto& members : layout.group_members) {
            for (int j = 0; j < num_bw; ++j) {
              chunk.group_product(members, j, len);
              joint_sum += sum_chunk(chunk.product.data(), len);
            }
          }
        }
        for (int64_t kj = 0; kj < num_kj; ++kj) row_sums[kj * n + row] += gram_sums[kj];
        joint_row_sums[row] += multiplicity * joint_sum;
      }
      if (tile.mirrored) {
        const std::lock_guard<std::mutex> lock(column_mutex);
        for (int64_t kj = 0; kj < num_kj; ++kj) {
          double* out = row_sums + kj * n + tile.col0;
          const double* col = column_sums.data() + kj * tile.cols;
          for (int64_t m = 0; m < tile.cols; ++m) out[m] += col[m];
        }
      }
    });
  }
  return sums;
}

// The loss from the sums of ALL rows, and (compute_grad) pass 2 over the pairs owned by the rows [row_begin, row_end)
// (as in pass 1): their gradient. The weights W_k are symmetrised, so a diagonal tile's row side is its whole
// gradient and a mirrored tile's gradient is its row side plus its column side.
std::tuple<at::Tensor, at::Tensor> dhsic_loss_and_rows_grad(const at::Tensor& z, const at::Tensor& groups,
                                                            const SliceLayout& layout, const BandwidthPlan& plan,
                                                            const at::Tensor& sums, int64_t row_begin,
                                                            int64_t row_end, bool compute_grad) {
  const int64_t n = z.size(0), num_codebooks = z.size(1);
  const int num_bw = plan.count;
  const DhsicStats stats = dhsic_statistics(sums, groups, num_bw, compute_grad);
  if (!compute_grad) return {stats.loss, at::empty({0}, z.options())};
  const float* gamma = stats.gamma.data_ptr<float>();  // gamma_{k,j} and beta_{k,j}(n) of docs/mmd_kernels.md
  const float* beta = stats.beta.data_ptr<float>();
  const float inv_n2 = static_cast<float>(1.0 / (static_cast<double>(n) * static_cast<double>(n)));

  // Pass 2: symmetrised weights W_k in place of the tiles, then the gradient GEMMs.
  const auto norms = slice_norms(z, layout);
  const float* norm_data = norms.data_ptr<float>();
  const TilePlane plane(n, num_codebooks, z.options());
  auto grad = at::zeros_like(z);
  GradientSide side(z, layout, grad, at::Tensor());
  for (const Tile& tile : plane.symmetric_tiles(row_begin, row_end)) {
    dot_tiles(z, z, layout, tile, plane);
    at::parallel_for(0, tile.rows, 1, [&](int64_t begin, int64_t end) {
      const FlushDenormals flush_denormals;
      DhsicChunk chunk(num_codebooks);
      std::vector<float> joint(num_codebooks * num_bw * kChunk);  // J_{k,j}: sum of the joint Grams of k's groups
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = tile.row0 + i;
        for (int64_t c0 = 0; c0 < tile.cols; c0 += kChunk) {
          const int64_t len = std::min(kChunk, tile.cols - c0);
          const int64_t col0 = tile.col0 + c0;
          chunk.load(plane, tile, z, norm_data, n, i, row, c0, col0, len, plan);
          std::fill(joint.begin(), joint.end(), 0.0f);
          for (const auto& members : layout.group_members) {
            for (int j = 0; j < num_bw; ++j) {
              chunk.group_product(members, j, len);
              for (int k : members) {
                float* jk = joint.data() + (k * num_bw + j) * kChunk;
#pragma omp simd
                for (int64_t m = 0; m < len; ++m) jk[m] += chunk.product[m];
              }
            }
          }
          for (int64_t k = 0; k < num_codebooks; ++k) {
            float* weights = plane.row(k, tile, i) + c0;
            std::fill(weights, weights + len, 0.0f);
            const float* d = chunk.dist.data() + k * kChunk;
            for (int j = 0; j < num_bw; ++j) {
              const float coef = plan.coef[j];
              const float gamma_kj = gamma[k * num_bw + j];
              const float* beta_kj = beta + (k * num_bw + j) * n;
              const float beta_row = beta_kj[row];
              const float* jk = joint.data() + (k * num_bw + j) * kChunk;
              const float* g = chunk.gram(k, j);
#pragma omp simd
              for (int64_t m = 0; m < len; ++m) {
                weights[m] += dhsic_entry_weight(coef, inv_n2, jk[m], g[m], gamma_kj, beta_row, beta_kj[col0 + m]);
              }
            }
#pragma omp simd
            for (int64_t m = 0; m < len; ++m) weights[m] = d[m] == 0.0f ? 0.0f : weights[m];  // duplicates: a - b = 0
          }
        }
      }
    });
    side.add_rows(plane, tile, z, 2.0);
    if (tile.mirrored) side.add_columns(plane, tile, z, 2.0);
  }
  side.finish();
  return {stats.loss, grad};
}

// The checked arguments and the slice layout (one slice per codebook) of the rows [row_begin, row_end).
struct DhsicSetup {
  BandwidthPlan plan;
  SliceLayout layout;
  int64_t row_end;
};

DhsicSetup dhsic_setup(const at::Tensor& z, const at::Tensor& groups, c10::ArrayRef<double> coefs,
                       c10::ArrayRef<int64_t> chain_src, c10::ArrayRef<int64_t> chain_step, double chain_base,
                       int64_t row_begin, int64_t row_end) {
  const auto checked =
      check_dhsic_args(c10::DeviceType::CPU, z, groups, coefs, chain_src, chain_step, chain_base, row_begin, row_end);
  return {checked.plan, make_layout(groups, z.size(1), z.size(2), /*allow_joint_slice=*/false), checked.row_end};
}

std::tuple<at::Tensor, at::Tensor> mmd_dhsic_cpu(const at::Tensor& z, const at::Tensor& groups,
                                                 c10::ArrayRef<double> coefs, c10::ArrayRef<int64_t> chain_src,
                                                 c10::ArrayRef<int64_t> chain_step, double chain_base,
                                                 bool compute_grad) {
  const auto setup = dhsic_setup(z, groups, coefs, chain_src, chain_step, chain_base, 0, -1);
  const auto sums = dhsic_sums(z, setup.layout, setup.plan, 0, setup.row_end);
  return dhsic_loss_and_rows_grad(z, groups, setup.layout, setup.plan, sums, 0, setup.row_end, compute_grad);
}

at::Tensor mmd_dhsic_sums_cpu(const at::Tensor& z, const at::Tensor& groups, c10::ArrayRef<double> coefs,
                              c10::ArrayRef<int64_t> chain_src, c10::ArrayRef<int64_t> chain_step, double chain_base,
                              int64_t row_begin, int64_t row_end) {
  const auto setup = dhsic_setup(z, groups, coefs, chain_src, chain_step, chain_base, row_begin, row_end);
  return dhsic_sums(z, setup.layout, setup.plan, row_begin, setup.row_end);
}

std::tuple<at::Tensor, at::Tensor> mmd_dhsic_rows_cpu(const at::Tensor& z, const at::Tensor& groups,
                                                      c10::ArrayRef<double> coefs, c10::ArrayRef<int64_t> chain_src,
                                                      c10::ArrayRef<int64_t> chain_step, double chain_base,
                                                      const at::Tensor& sums, int64_t row_begin, int64_t row_end,
                                                      bool compute_grad) {
  const auto setup = dhsic_setup(z, groups, coefs, chain_src, chain_step, chain_base, row_begin, row_end);
  check_dhsic_sums(sums, z, setup.plan);
  return dhsic_loss_and_rows_grad(z, groups, setup.layout, setup.plan, sums.contiguous(), row_begin, setup.row_end,
                                  compute_grad);
}

}  // namespace
}  // namespace mmd
}  // namespace mmdkernels

TORCH_LIBRARY_IMPL(mmdkernels, CPU, m) {
  m.impl("mmd_dhsic", &mmdkernels::mmd::mmd_dhsic_cpu);
  m.impl("mmd_dhsic_sums", &mmdkernels::mmd::mmd_dhsic_sums_cpu);
  m.impl("mmd_dhsic_rows", &mmdkernels::mmd::mmd_dhsic_rows_cpu);
}
