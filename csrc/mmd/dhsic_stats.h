// The dHSIC statistics between the two passes (docs/mmd_kernels.md, "mmd_dhsic"): the loss and the gradient
// terms gamma and beta from the pass-1 sums. One routine for the CPU ops (dhsic_cpu.cpp) and the CUDA ops
// (mmd_cuda.cu), in ATen tensor ops on the sums' device (O(G A N) work, no host synchronisation on a GPU);
// mmdkernels/mmd/dhsic_stats.py is the same sequence of tensor ops for the Triton backend.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace mmdkernels {
namespace mmd {

struct DhsicStats {
  at::Tensor loss;   // float32 []
  at::Tensor gamma;  // float32 [K, A], contiguous (undefined without the gradient terms)
  at::Tensor beta;   // float32 [K, A, N], contiguous (undefined without the gradient terms)
};

// sums: float64 [K*A + 1, N], the pass-1 sums of ALL rows (row k*A + j: sum_m E_{k,j}(n, m); the last row's total:
// the joint sum). groups: [G, K] 0/1 mask on the same device.
// Products over a group's codebooks are exp(groups @ log(.)): every row mean is >= 1/N (E = 1 on the diagonal),
// so the logs are finite, and prod_{i in g, i != k} is the group's product divided by the k-th factor.
inline DhsicStats dhsic_statistics(const at::Tensor& sums, const at::Tensor& groups, int64_t num_bandwidths,
                                   bool with_gradient_terms) {
  const int64_t num_samples = sums.size(1), num_codebooks = groups.size(1), num_groups = groups.size(0);
  const auto double_options = sums.options().dtype(at::kDouble);
  const at::Tensor row_sums =
      sums.narrow(0, 0, num_codebooks * num_bandwidths).view({num_codebooks, num_bandwidths, num_samples});
  const at::Tensor joint_total = sums.select(0, num_codebooks * num_bandwidths).sum();

  const double n = static_cast<double>(num_samples);
  const at::Tensor row_means = row_sums / n;                          // rbar [K, A, N]
  const at::Tensor means = row_means.mean(-1);                        // s [K, A]
  const at::Tensor membership = groups.ne(0).to(at::kDouble);         // [G, K]
  const at::Tensor mean_products = membership.mm(means.log()).exp();  // [G, A]
  at::Tensor cross_sum = at::zeros({}, double_options);
  at::Tensor beta;
  if (with_gradient_terms) beta = at::empty({num_codebooks, num_bandwidths, num_samples}, double_options);
  // Chunks over n bound the [G, A, chunk] product tensor (G = K (K - 1) / 2 in pairwise mode).
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 24) / std::max<int64_t>(1, num_groups * num_bandwidths));
  for (int64_t n0 = 0; n0 < num_samples; n0 += chunk) {
    const int64_t length = std::min(chunk, num_samples - n0);
    const at::Tensor rbar = row_means.narrow(2, n0, length);
    const at::Tensor row_products =
        membership.mm(rbar.log().reshape({num_codebooks, num_bandwidths * length})).exp();  // [G, A * length]
    cross_sum += row_products.sum();
    if (with_gradient_terms) {
      // sum over the groups containing k of prod_{i in g} rbar_i, over rbar_k
      const at::Tensor products = membership.t().mm(row_products).view({num_codebooks, num_bandwidths, length});
      beta.narrow(2, n0, length).copy_(products / rbar * (2.0 / (n * n)));
    }
  }
  DhsicStats stats;
  stats.loss = (joint_total / (n * n) + mean_products.sum() - cross_sum * (2.0 / n)).to(at::kFloat);
  if (with_gradient_terms) {
    stats.gamma = (membership.t().mm(mean_products) / means / (n * n)).to(at::kFloat).contiguous();
    stats.beta = beta.to(at::kFloat).contiguous();
  }
  return stats;
}

}  // namespace mmd
}  // namespace mmdkernels
