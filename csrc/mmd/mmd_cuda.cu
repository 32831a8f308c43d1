// CUDA backend of the fused MMD ops, host side (contract: docs/mmd_kernels.md): argument checks (mmd_args.h), launch
// configuration, the shuffle and dHSIC ops over row ranges, the dHSIC statistics between the passes
// (dhsic_stats.h) and the registration. The tile kernels themselves (device code) are in tiles_cuda.h; the symmetric
// planes (xx, yy, dHSIC's Grams) walk each unordered pair of blocks once (block_pairs.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "mmd/dhsic_stats.h"
#include "mmd/mmd_args.h"
#include "mmd/tiles_cuda.h"

namespace mmdkernels {
namespace mmd {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct LaunchConfig {
  int tile;
  size_t shared_bytes;
  dim3 grid;  // (row blocks, column-step splits)
  int tiles_per_split;
  int first_block;  // symmetric: the global row block of blockIdx.x = 0
  int num_blocks;   // blocks of `tile` samples covering N
  int64_t num_ctas() const { return static_cast<int64_t>(grid.x) * grid.y; }
};

// The rows [row_begin, row_end) of the plane: against every column tile, or (symmetric) the block pairs the global
// row blocks they touch own (block_pairs.h; rows outside the range are masked, so any partition covers each pair
// once). Call only for a non-empty range.
LaunchConfig make_launch_config(int64_t row_begin, int64_t row_end, int64_t num_samples, int64_t num_codebooks,
                                int64_t num_groups, bool symmetric) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const size_t limit = props->sharedMemPerBlockOptin;
  LaunchConfig config{};
  if (TileShape<64>::shared_bytes(num_codebooks, num_groups) <= limit) {
    config.tile = 64;
    config.shared_bytes = TileShape<64>::shared_bytes(num_codebooks, num_groups);
  } else {
    config.tile = 32;
    config.shared_bytes = TileShape<32>::shared_bytes(num_codebooks, num_groups);
    TORCH_CHECK(config.shared_bytes <= limit, "mmd (CUDA): ", num_codebooks, " codebooks and ", num_groups,
                " groups need ", config.shared_bytes, " bytes of shared memory per block; this GPU allows ", limit);
  }
  const int64_t num_blocks = num_sample_blocks(num_samples, config.tile);
  int64_t row_blocks = ceil_div(row_end - row_begin, config.tile), steps = num_blocks;
  if (symmetric) {
    config.first_block = static_cast<int>(row_begin / config.tile);
    row_blocks = num_sample_blocks(row_end, config.tile) - config.first_block;
    steps = max_owned_steps(num_blocks);
  }
  config.num_blocks = static_cast<int>(num_blocks);
  // Enough CTAs for a few waves: split the column steps of each row block over several CTAs.
  const int64_t splits = std::clamp<int64_t>(ceil_div(4 * props->multiProcessorCount, row_blocks), 1, steps);
  config.tiles_per_split = static_cast<int>(ceil_div(steps, splits));
  config.grid = dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(ceil_div(steps, config.tiles_per_split)));
  return config;
}

template <int T, Pass kPass>
void launch_tiles_with(const LaunchConfig& config, TileArgs args, const BandwidthPlan& plan) {
  args.tiles_per_split = config.tiles_per_split;
  args.first_block = config.first_block;
  args.num_blocks = config.num_blocks;
  auto* kernel = &mmd_tiles_kernel<T, kPass>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(config.shared_bytes)));
  kernel<<<config.grid, kThreads, config.shared_bytes, at::cuda::getCurrentCUDAStream()>>>(args, plan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Pass kPass>
void launch_tiles(const LaunchConfig& config, const TileArgs& args, const BandwidthPlan& plan) {
  if (config.tile == 64) {
    launch_tiles_with<64, kPass>(config, args, plan);
  } else {
    launch_tiles_with<32, kPass>(config, args, plan);
  }
}

// Fields shared by every launch on the samples z, for the rows [row_begin, row_end).
TileArgs base_args(const at::Tensor& z, const at::Tensor& groups, bool compute_grad, int64_t row_begin,
                   int64_t row_end) {
  TileArgs args{};
  args.groups = groups.data_ptr<int32_t>();
  args.num_samples = static_cast<int>(z.size(0));
  args.row_begin = static_cast<int>(row_begin);
  args.row_end = static_cast<int>(row_end);
  args.num_codebooks = static_cast<int>(z.size(1));
  args.dim = static_cast<int>(z.size(2));
  args.num_groups = static_cast<int>(groups.size(0));
  args.compute_grad = compute_grad;
  return args;
}

// The shuffle sums over the rows [row_begin, row_end): (loss float64 [], grad float32 [N, K, D] or [0]).
std::tuple<at::Tensor, at::Tensor> mmd_shuffle_rows_cuda(const at::Tensor& z, const at::Tensor& perms,
                                                         const at::Tensor& groups, c10::ArrayRef<double> coefs,
                                                         c10::ArrayRef<int64_t> chain_src,
                                                         c10::ArrayRef<int64_t> chain_step, double chain_base,
                                                         c10::ArrayRef<double> term_weights, int64_t row_begin,
                                                         int64_t row_end, bool compute_grad) {
  const auto checked = check_shuffle_args(c10::DeviceType::CUDA, z, perms, groups, coefs, chain_src, chain_step,
                                          chain_base, term_weights, row_begin, row_end);
  const int64_t num_samples = z.size(0), num_codebooks = z.size(1), dim = z.size(2);
  row_end = checked.row_end;
  const BandwidthPlan& plan = checked.plan;
  const c10::cuda::CUDAGuard device_guard(z.device());

  const at::Tensor groups_c = groups.contiguous();
  // y[m, k, :] = z[perms[k, m], k, :]
  const at::Tensor sample_index = perms.t();
  const at::Tensor y = z.gather(0, sample_index.unsqueeze(-1).expand({num_samples, num_codebooks, dim}));
  const at::Tensor x_norms = z.square().sum(-1);
  const at::Tensor y_norms = x_norms.gather(0, sample_index);
  at::Tensor loss = at::zeros({}, z.options().dtype(at::kDouble));
  at::Tensor grad_x, grad_y;
  if (compute_grad) {
    grad_x = at::zeros_like(z);
    grad_y = at::zeros_like(z);
  }

  struct Term {
    const at::Tensor& rows;
    const at::Tensor& cols;
    const at::Tensor& row_norms;
    const at::Tensor& col_norms;
    at::Tensor* grad_rows;
    at::Tensor* grad_cols;
  };
  const Term terms[3] = {{z, z, x_norms, x_norms, &grad_x, nullptr},
                         {y, y, y_norms, y_norms, &grad_y, nullptr},
                         {z, y, x_norms, y_norms, &grad_x, &grad_y}};
  for (int t = 0; t < 3; ++t) {
    if (term_weights[t] == 0.0 || row_end == row_begin) continue;
    const Term& term = terms[t];
    const bool symmetric = term.grad_cols == nullptr;
    const LaunchConfig config =
        make_launch_config(row_begin, row_end, num_samples, num_codebooks, groups_c.size(0), symmetric);
    TileArgs args = base_args(z, groups_c, compute_grad, row_begin, row_end);
    args.rows = term.rows.data_ptr<float>();
    args.cols = term.cols.data_ptr<float>();
    args.row_norms = term.row_norms.data_ptr<float>();
    args.col_norms = term.col_norms.data_ptr<float>();
    args.same_set = args.symmetric = symmetric;
    args.term_weight = static_cast<float>(term_weights[t]);
    // d/da |a - b|^2 = 2 (a - b); a symmetric term counts every pair twice (both orders): x4 on both sides of a
    // mirrored tile, and on the row side of a diagonal one, which holds both triangles.
    args.row_factor = args.col_factor = symmetric ? 4.0f : 2.0f;
    if (compute_grad) {
      args.grad_rows = term.grad_rows->data_ptr<float>();
      args.grad_cols = term.grad_cols != nullptr ? term.grad_cols->data_ptr<float>() : nullptr;
    }
    const at::Tensor loss_partials = at::zeros({config.num_ctas()}, loss.options());
    args.loss_partials = loss_partials.data_ptr<double>();
    launch_tiles<Pass::kShuffle>(config, args, plan);
    loss.add_(loss_partials.sum());
  }

  if (!compute_grad) return {loss, at::empty({0}, z.options())};
  // grad[perms[k, m], k, :] += grad_y[m, k, :]
  grad_x.scatter_add_(0, sample_index.unsqueeze(-1).expand({num_samples, num_codebooks, dim}), grad_y);
  return {loss, grad_x};
}

std::tuple<at::Tensor, at::Tensor> mmd_shuffle_cuda(const at::Tensor& z, const at::Tensor& perms,
                                                    const at::Tensor& groups, c10::ArrayRef<double> coefs,
                                                    c10::ArrayRef<int64_t> chain_src,
                                                    c10::ArrayRef<int64_t> chain_step, double chain_base,
                                                    c10::ArrayRef<double> term_weights, bool compute_grad) {
  auto [loss, grad] = mmd_shuffle_rows_cuda(z, perms, groups, coefs, chain_src, chain_step, chain_base,
                                            term_weights, 0, -1, compute_grad);
  return {loss.to(at::kFloat), grad};
}

// dHSIC pass 1 over the rows [row_begin, row_end): float64 [K*A + 1, N], row k*A + j = the sums of E_{k,j}(n, m) over
// the pairs the rows in range own (block_pairs.h: a mirrored pair adds to row n and to row m), the last row = the
// joint sum of those pairs in column 0 (only its total is used). Summed over a partition of the rows: the full sums.
at::Tensor dhsic_sums_cuda(const at::Tensor& z, const at::Tensor& groups_c, const BandwidthPlan& plan, int64_t row_begin,
                           int64_t row_end) {
  const int64_t num_samples = z.size(0), num_codebooks = z.size(1), num_bandwidths = plan.count;
  const auto double_options = z.options().dtype(at::kDouble);
  at::Tensor sums = at::zeros({num_codebooks * num_bandwidths + 1, num_samples}, double_options);
  if (row_end == row_begin) return sums;
  const LaunchConfig config =
      make_launch_config(row_begin, row_end, num_samples, num_codebooks, groups_c.size(0), /*symmetric=*/true);
  const at::Tensor norms = z.square().sum(-1);
  at::Tensor joint_partials = at::zeros({config.num_ctas()}, double_options);
  TileArgs args = base_args(z, groups_c, false, row_begin, row_end);
  args.rows = args.cols = z.data_ptr<float>();
  args.row_norms = args.col_norms = norms.data_ptr<float>();
  args.same_set = args.symmetric = true;
  args.row_sums = sums.data_ptr<double>();
  args.loss_partials = joint_partials.data_ptr<double>();
  launch_tiles<Pass::kDhsicSums>(config, args, plan);
  sums.select(0, num_codebooks * num_bandwidths).narrow(0, 0, 1).copy_(joint_partials.sum().reshape({1}));
  return sums;
}

// The loss from the pass-1 sums of ALL rows, and (compute_grad) the gradient of the pairs the rows [row_begin,
// row_end) own (the weights W_k are symmetrised: the row side of a diagonal tile, both sides of a mirrored one).
std::tuple<at::Tensor, at::Tensor> dhsic_loss_and_rows_grad_cuda(const at::Tensor& z, const at::Tensor& groups_c,
                                                                 const BandwidthPlan& plan, const at::Tensor& sums,
                                                                 int64_t row_begin, int64_t row_end,
                                                                 bool compute_grad) {
  const int64_t num_samples = z.size(0), num_codebooks = z.size(1);
  const DhsicStats stats = dhsic_statistics(sums, groups_c, plan.count, compute_grad);
  if (!compute_grad) return {stats.loss, at::empty({0}, z.options())};

  // Pass 2: recompute the tiles with the gradient weights.
  at::Tensor grad = at::zeros_like(z);
  if (row_end == row_begin) return {stats.loss, grad};
  const LaunchConfig config =
      make_launch_config(row_begin, row_end, num_samples, num_codebooks, groups_c.size(0), /*symmetric=*/true);
  const at::Tensor norms = z.square().sum(-1);
  TileArgs args = base_args(z, groups_c, true, row_begin, row_end);
  args.rows = args.cols = z.data_ptr<float>();
  args.row_norms = args.col_norms = norms.data_ptr<float>();
  args.same_set = args.symmetric = true;
  args.gamma = stats.gamma.data_ptr<float>();
  args.beta = stats.beta.data_ptr<float>();
  const double n = static_cast<double>(num_samples);
  args.inv_n2 = static_cast<float>(1.0 / (n * n));
  args.row_factor = args.col_factor = 2.0f;
  args.grad_rows = grad.data_ptr<float>();
  launch_tiles<Pass::kDhsicGrad>(config, args, plan);
  return {stats.loss, grad};
}

std::tuple<at::Tensor, at::Tensor> mmd_dhsic_cuda(const at::Tensor& z, const at::Tensor& groups,
                                                  c10::ArrayRef<double> coefs, c10::ArrayRef<int64_t> chain_src,
                                                  c10::ArrayRef<int64_t> chain_step, double chain_base,
                                                  bool compute_grad) {
  const auto checked =
      check_dhsic_args(c10::DeviceType::CUDA, z, groups, coefs, chain_src, chain_step, chain_base, 0, -1);
  const c10::cuda::CUDAGuard device_guard(z.device());
  const at::Tensor groups_c = groups.contiguous();
  const at::Tensor sums = dhsic_sums_cuda(z, groups_c, checked.plan, 0, checked.row_end);
  return dhsic_loss_and_rows_grad_cuda(z, groups_c, checked.plan, sums, 0, checked.row_end, compute_grad);
}

at::Tensor mmd_dhsic_sums_cuda(const at::Tensor& z, const at::Tensor& groups, c10::ArrayRef<double> coefs,
                               c10::ArrayRef<int64_t> chain_src, c10::ArrayRef<int64_t> chain_step,
                               double chain_base, int64_t row_begin, int64_t row_end) {
  const auto checked = check_dhsic_args(c10::DeviceType::CUDA, z, groups, coefs, chain_src, chain_step, chain_base,
                                        row_begin, row_end);
  const c10::cuda::CUDAGuard device_guard(z.device());
  return dhsic_sums_cuda(z, groups.contiguous(), checked.plan, row_begin, checked.row_end);
}

std::tuple<at::Tensor, at::Tensor> mmd_dhsic_rows_cuda(const at::Tensor& z, const at::Tensor& groups,
                                                       c10::ArrayRef<double> coefs, c10::ArrayRef<int64_t> chain_src,
                                                       c10::ArrayRef<int64_t> chain_step, double chain_base,
                                                       const at::Tensor& sums, int64_t row_begin, int64_t row_end,
                                                       bool compute_grad) {
  const auto checked = check_dhsic_args(c10::DeviceType::CUDA, z, groups, coefs, chain_src, chain_step, chain_base,
                                        row_begin, row_end);
  check_dhsic_sums(sums, z, checked.plan);
  const c10::cuda::CUDAGuard device_guard(z.device());
  return dhsic_loss_and_rows_grad_cuda(z, groups.contiguous(), checked.plan, sums.contiguous(), row_begin,
                                       checked.row_end, compute_grad);
}

}  // namespace
}  // namespace mmd
}  // namespace mmdkernels

TORCH_LIBRARY_IMPL(mmdkernels, CUDA, m) {
  m.impl("mmd_shuffle", &mmdkernels::mmd::mmd_shuffle_cuda);
  m.impl("mmd_dhsic", &mmdkernels::mmd::mmd_dhsic_cuda);
  m.impl("mmd_shuffle_rows", &mmdkernels::mmd::mmd_shuffle_rows_cuda);
  m.impl("mmd_dhsic_sums", &mmdkernels::mmd::mmd_dhsic_sums_cuda);
  m.impl("mmd_dhsic_rows", &mmdkernels::mmd::mmd_dhsic_rows_cuda);
}
