// The MMD ops' argument contract (docs/mmd_kernels.md, "Inputs"), checked once for every backend: the CPU ops
// (mmd_cpu.cpp, dhsic_cpu.cpp) and the CUDA ops (mmd_cuda.cu) call these with their device type, and the bandwidth
// plan arguments become a BandwidthPlan (mmd_tile.h) here. The Triton host code (mmdkernels/mmd/triton_common.py)
// checks the same contract in Python. Host code only: nothing here reads tensor data, so no device synchronises.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/checks.h"
#include "mmd/mmd_tile.h"

namespace mmdkernels {
namespace mmd {

// z: float32 [N, K, D], contiguous, on the op's device; 2 <= N, 1 <= K <= kMaxCodebooks, 1 <= D (N and D fit int32).
inline void check_samples(const at::Tensor& z, c10::DeviceType device_type) {
  TORCH_CHECK(z.device().type() == device_type, "z must be a ", device_type, " tensor, got a tensor on ", z.device());
  MMD_CHECK_DTYPE(z, at::kFloat);
  MMD_CHECK_DIM(z, 3);
  MMD_CHECK_CONTIGUOUS(z);
  TORCH_CHECK(z.size(0) >= 2 && z.size(0) <= INT32_MAX, "z must hold N >= 2 samples (dim 0), got shape ", z.sizes());
  TORCH_CHECK(z.size(1) >= 1 && z.size(1) <= kMaxCodebooks, "z must have 1 to ", kMaxCodebooks,
              " codebooks (dim 1), got shape ", z.sizes());
  TORCH_CHECK(z.size(2) >= 1 && z.size(2) <= INT32_MAX, "z must have a feature size D >= 1 (dim 2), got shape ",
              z.sizes());
}

// groups: int32 [G, K] on z's device, 1 <= G. Its values must be 0/1 with at least one 1 per row; the CPU ops check
// them while building the slice layout (tiles_cpu.cpp), the CUDA ops take any non-zero entry as membership and never
// copy the mask to the host.
inline void check_groups(const at::Tensor& groups, const at::Tensor& z) {
  MMD_CHECK_DEVICE(groups, z.device());
  MMD_CHECK_DTYPE(groups, at::kInt);
  MMD_CHECK_DIM(groups, 2);
  TORCH_CHECK(groups.size(1) == z.size(1) && groups.size(0) >= 1 && groups.size(0) <= INT32_MAX,
              "groups must have shape [G >= 1, K = ", z.size(1), "], got ", groups.sizes());
}

// perms: int64 [K, N] on z's device, one permutation of 0..N-1 per codebook. The CPU op checks the index range;
// on CUDA the gather through perms bound-checks it on the device.
inline void check_perms(const at::Tensor& perms, const at::Tensor& z) {
  MMD_CHECK_DEVICE(perms, z.device());
  MMD_CHECK_DTYPE(perms, at::kLong);
  const int64_t num_codebooks = z.size(1), num_samples = z.size(0);
  MMD_CHECK_SHAPE(perms, num_codebooks, num_samples);
}

inline void check_term_weights(c10::ArrayRef<double> term_weights) {
  TORCH_CHECK(term_weights.size() == 3, "term_weights must be [w_xx, w_yy, w_xy], got ", term_weights.size(),
              " values");
}

// row_end = -1 means N; checks 0 <= row_begin <= row_end <= N and returns row_end.
inline int64_t check_row_range(int64_t row_begin, int64_t row_end, int64_t n) {
  if (row_end < 0) row_end = n;
  TORCH_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= n,
              "row range must satisfy 0 <= row_begin <= row_end <= N = ", n, ", got [", row_begin, ", ", row_end, ")");
  return row_end;
}

// The bandwidth plan (mmdkernels/mmd/plan.py builds it): 1..kMaxBandwidths positive coefs; chain_src[j] is
// kDirectExp (-2), kFromBase (-1) or an earlier bandwidth's index; every chain_step[j] is in [1, kMaxChainPower]
// (unused for kDirectExp, where plan.py gives 1); chain_base > 0 when some bandwidth uses the base.
inline BandwidthPlan make_plan(c10::ArrayRef<double> coefs, c10::ArrayRef<int64_t> chain_src,
                               c10::ArrayRef<int64_t> chain_step, double chain_base) {
  const int64_t count = static_cast<int64_t>(coefs.size());
  TORCH_CHECK(count >= 1 && count <= kMaxBandwidths, "coefs must hold 1 to ", kMaxBandwidths, " bandwidths, got ",
              count);
  TORCH_CHECK(static_cast<int64_t>(chain_src.size()) == count && static_cast<int64_t>(chain_step.size()) == count,
              "chain_src and chain_step must have one entry per coef (", count, "), got ", chain_src.size(), " and ",
              chain_step.size());
  BandwidthPlan plan{};
  plan.count = static_cast<int>(count);
  plan.base_coef = static_cast<float>(chain_base);
  for (int64_t j = 0; j < count; ++j) {
    const int64_t src = chain_src[j];
    TORCH_CHECK(coefs[j] > 0.0, "coefs must be positive, got coefs[", j, "] = ", coefs[j]);
    TORCH_CHECK(src == kDirectExp || src == kFromBase || (src >= 0 && src < j), "chain_src[", j,
                "] must be -2, -1 or an earlier bandwidth's index, got ", src);
    TORCH_CHECK(chain_step[j] >= 1 && chain_step[j] <= kMaxChainPower, "chain_step[", j, "] must be in [1, ",
                kMaxChainPower, "], got ", chain_step[j]);
    TORCH_CHECK(src != kFromBase || chain_base > 0.0, "chain_base must be positive when chain_src[", j,
                "] = -1, got ", chain_base);
    plan.coef[j] = static_cast<float>(coefs[j]);
    plan.src[j] = static_cast<int>(src);
    plan.step[j] = static_cast<int>(chain_step[j]);
  }
  return plan;
}

// The checked arguments of an op over the rows [row_begin, row_end) of the N x N plane (row_end resolved).
struct OpArgs {
  BandwidthPlan plan;
  int64_t row_end;
};

// mmd_shuffle / mmd_shuffle_rows (mmd_shuffle: the full range, row_end = -1).
inline OpArgs check_shuffle_args(c10::DeviceType device_type, const at::Tensor& z, const at::Tensor& perms,
                                 const at::Tensor& groups, c10::ArrayRef<double> coefs,
                                 c10::ArrayRef<int64_t> chain_src, c10::ArrayRef<int64_t> chain_step,
                                 double chain_base, c10::ArrayRef<double> term_weights, int64_t row_begin,
                                 int64_t row_end) {
  check_samples(z, device_type);
  check_perms(perms, z);
  check_groups(groups, z);
  check_term_weights(term_weights);
  const BandwidthPlan plan = make_plan(coefs, chain_src, chain_step, chain_base);
  return {plan, check_row_range(row_begin, row_end, z.size(0))};
}

// mmd_dhsic / mmd_dhsic_sums / mmd_dhsic_rows (mmd_dhsic: the full range).
inline OpArgs check_dhsic_args(c10::DeviceType device_type, const at::Tensor& z, const at::Tensor& groups,
                               c10::ArrayRef<double> coefs, c10::ArrayRef<int64_t> chain_src,
                               c10::ArrayRef<int64_t> chain_step, double chain_base, int64_t row_begin,
                               int64_t row_end) {
  check_samples(z, device_type);
  check_groups(groups, z);
  const BandwidthPlan plan = make_plan(coefs, chain_src, chain_step, chain_base);
  return {plan, check_row_range(row_begin, row_end, z.size(0))};
}

// sums (mmd_dhsic_rows): the pass-1 sums of all rows, float64 [K*A + 1, N] on z's device.
inline void check_dhsic_sums(const at::Tensor& sums, const at::Tensor& z, const BandwidthPlan& plan) {
  MMD_CHECK_DEVICE(sums, z.device());
  MMD_CHECK_DTYPE(sums, at::kDouble);
  const int64_t num_codebooks = z.size(1), num_samples = z.size(0);
  MMD_CHECK_SHAPE(sums, num_codebooks * plan.count + 1, num_samples);
}

}  // namespace mmd
}  // namespace mmdkernels
