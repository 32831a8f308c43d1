// Argument checks of the few-row linear ops, shared by the CPU (linear_cpu.cpp) and CUDA (linear_cuda.cu) kernels:
// one wording of every error, whichever device runs the op.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "common/checks.h"

namespace mmdkernels::linear {

// x float32 [M <= max_rows, D] with unit stride in D; weight [N, D] contiguous on x's device; bias float32 [N] or
// None (the weight's dtype is the caller's to check).
inline void check_rows_and_bias(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                int64_t max_rows) {
  MMD_CHECK_DIM(x, 2);
  MMD_CHECK_DIM(weight, 2);
  MMD_CHECK_DTYPE(x, at::kFloat);
  MMD_CHECK_DEVICE(weight, x.device());
  MMD_CHECK_CONTIGUOUS(weight);
  TORCH_CHECK(x.stride(1) == 1, "x must have unit stride in its last dim, got strides ", x.strides());
  TORCH_CHECK(x.size(0) <= max_rows, "x must have at most ", max_rows, " rows (a decode step), got shape ", x.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), "weight must have shape (N, D = ", x.size(1), ") to match x, got ",
              weight.sizes());
  if (bias.has_value()) {
    MMD_CHECK_DTYPE(*bias, at::kFloat);
    MMD_CHECK_DEVICE(*bias, x.device());
    MMD_CHECK_CONTIGUOUS(*bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (N = ", weight.size(0),
                "), got ", bias->sizes());
  }
}

// int8 weights need their per-output-channel scale, float32 [N] on x's device; other dtypes take none.
inline void check_scale(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale) {
  const int64_t out_features = weight.size(0);
  if (weight.scalar_type() != at::kChar) {
    const auto dtype = weight.scalar_type();
    const char* name = dtype == at::kBFloat16 ? "bfloat16" : dtype == at::kHalf ? "float16" : c10::toString(dtype);
    TORCH_CHECK(!scale.has_value(), "scale must be None for ", name, " weights (it belongs to int8 weights)");
    return;
  }
  TORCH_CHECK(scale.has_value(), "scale must be given for int8 weights: float32 [N = ", out_features, "]");
  MMD_CHECK_DTYPE(*scale, at::kFloat);
  MMD_CHECK_DEVICE(*scale, x.device());
  MMD_CHECK_CONTIGUOUS(*scale);
  TORCH_CHECK(scale->dim() == 1 && scale->size(0) == out_features, "scale must have shape (N = ", out_features,
              "), got ", scale->sizes());
}

}  // namespace mmdkernels::linear
