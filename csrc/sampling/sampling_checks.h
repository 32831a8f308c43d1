// Argument checks of mmdkernels::sample_tokens, shared by the CPU and CUDA implementations (the Python layer has
// already checked; these guard direct callers of torch.ops.mmdkernels.sample_tokens).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "common/checks.h"

namespace mmdkernels {
namespace sampling {

// Returns B, the number of sampled sequences (logits rows / 2 with use_cfg).
inline int64_t check_sample_tokens_args(const at::Tensor& logits, const at::Tensor& uniforms, double temperature,
                                        int64_t top_k, double top_p, bool use_cfg) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              "logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  MMD_CHECK_DIM(logits, 3);
  MMD_CHECK_CONTIGUOUS(logits);
  TORCH_CHECK(!use_cfg || logits.size(0) % 2 == 0, "with use_cfg, logits must have an even number of rows [2B, K, V], ",
              "got shape ", logits.sizes());
  TORCH_CHECK(logits.size(2) >= 1 && logits.size(2) < (int64_t{1} << 31), "logits must have 1 <= V < 2^31, got shape ",
              logits.sizes());
  const int64_t batch = use_cfg ? logits.size(0) / 2 : logits.size(0);
  MMD_CHECK_DEVICE(uniforms, logits.device());
  MMD_CHECK_DTYPE(uniforms, at::kDouble);
  MMD_CHECK_SHAPE(uniforms, batch, logits.size(1));
  MMD_CHECK_CONTIGUOUS(uniforms);
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0.0, "temperature must be finite and >= 0, got ",
              temperature);
  TORCH_CHECK(top_k >= 0, "top_k must be >= 0, got ", top_k);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1], got ", top_p);
  return batch;
}

}  // namespace sampling
}  // namespace mmdkernels
