// One KV-cached decode step through every layer of the MusicGen-style decoder (models/lm.py, DecoderLayer), on the
// CPU, in one call: the same computation as the Python layers' decode path, with the per-op Python overhead (~40
// ops a layer) gone. The heavy parts are this library's own ops, called through the dispatcher:
// mmdkernels::small_batch_linear (every projection, GELU fused into fc1; small_batch_linear_quantized for bfloat16
// or int8 projections, mmdkernels/linear/quantize.py) and mmdkernels::decode_attention (self- and cross-attention);
// the rest is at::layer_norm, a cache write and in-place residual adds.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "common/checks.h"

namespace mmdkernels::decode {
namespace {

// Per-layer tensors, in this order: mmdkernels/decode/reference.py, DecoderLayerWeights (tests/test_decode_layers.py
// checks that the two orders agree).
enum Weight : int64_t {
  kSelfNormWeight,
  kSelfNormBias,
  kQkv,
  kSelfOut,
  kCrossNormWeight,
  kCrossNormBias,
  kCrossQ,
  kCrossOut,
  kMlpNormWeight,
  kMlpNormBias,
  kFc1,
  kFc2,
  kWeightsPerLayer,
};

// One projection: float32 weights through small_batch_linear (or at::linear where the dispatcher prefers it for
// this row count, mmdkernels/_dispatch.py); bfloat16 / int8 weights (+ scale) through small_batch_linear_quantized
// at every row count (torch has no GEMV on them).
at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                   bool torch_linear, bool gelu = false) {
  if (weight.scalar_type() != at::kFloat) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mmdkernels::small_batch_linear_quantized", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           const std::optional<at::Tensor>&, bool)>();
    return op.call(x, weight, scale, std::nullopt, gelu);
  }
  TORCH_CHECK(!scale.has_value(), "a scale belongs to int8 weights only, got one for a float32 projection");
  if (torch_linear) {
    const auto y = at::linear(x, weight);
    return gelu ? at::gelu(y) : y;
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmdkernels::small_batch_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         bool)>();
  return op.call(x, weight, std::nullopt, gelu);
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                  double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmdkernels::decode_attention", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         double)>();
  return op.call(q, k, v, lengths, scale);
}

void check_args(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& scales,
                const at::Tensor& self_k, const at::Tensor& self_v,
                const at::Tensor& cross_k, const at::Tensor& cross_v, const at::Tensor& cross_lengths, int64_t step,
                int64_t num_heads) {
  MMD_CHECK_DIM(x, 2);
  MMD_CHECK_DTYPE(x, at::kFloat);
  MMD_CHECK_DEVICE(x, at::Device(at::kCPU));
  const int64_t batch = x.size(0), dim = x.size(1);
  TORCH_CHECK(num_heads >= 1 && dim % num_heads == 0, "num_heads must divide D = ", dim, ", got ", num_heads);
  TORCH_CHECK(!weights.empty() && weights.size() % kWeightsPerLayer == 0, "weights must hold ", kWeightsPerLayer,
              " tensors per layer, got ", weights.size());
  const int64_t layers = static_cast<int64_t>(weights.size()) / kWeightsPerLayer;
  TORCH_CHECK(scales.empty() || scales.size() == weights.size(), "scales must be empty or hold one entry per weight (",
              weights.size(), "), got ", scales.size());
  for (const auto* cache : {&self_k, &self_v, &cross_k, &cross_v}) {
    MMD_CHECK_DTYPE(*cache, at::kFloat);
    TORCH_CHECK(cache->dim() == 5 && cache->size(0) == layers && cache->size(1) == batch &&
                    cache->size(2) == num_heads && cache->size(4) == dim / num_heads,
                "caches must have shape [L=", layers, ", B=", batch, ", H=", num_heads, ", S, Dh=", dim / num_heads,
                "], got ", cache->sizes());
  }
  TORCH_CHECK(step >= 0 && step < self_k.size(3), "step must be in [0, S_max = ", self_k.size(3), "), got ", step);
  TORCH_CHECK(self_v.sizes() == self_k.sizes(), "self_v must have self_k's shape ", self_k.sizes());
  TORCH_CHECK(cross_v.sizes() == cross_k.sizes(), "cross_v must have cross_k's shape ", cross_k.sizes());
  MMD_CHECK_DTYPE(cross_lengths, at::kLong);
  MMD_CHECK_SHAPE(cross_lengths, batch);
}

at::Tensor lm_decode_layers_cpu(const at::Tensor& x_in, at::TensorList weights,
                                const c10::List<std::optional<at::Tensor>>& scales, const at::Tensor& self_k,
                                const at::Tensor& self_v, const at::Tensor& cross_k, const at::Tensor& cross_v,
                                const at::Tensor& cross_lengths, int64_t step, int64_t num_heads, double eps,
                                bool torch_linear) {
  check_args(x_in, weights, scales, self_k, self_v, cross_k, cross_v, cross_lengths, step, num_heads);
  const int64_t batch = x_in.size(0), dim = x_in.size(1), head_dim = dim / num_heads;
  const int64_t layers = static_cast<int64_t>(weights.size()) / kWeightsPerLayer;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const auto self_lengths = at::full({batch}, step + 1, x_in.options().dtype(at::kLong));
  at::Tensor x = x_in.contiguous().clone();  // the residual stream, updated in place
  for (int64_t layer = 0; layer < layers; ++layer) {
    const at::Tensor* w = weights.data() + layer * kWeightsPerLayer;
    // projection i of this layer with its scale (int8) or none
    auto proj = [&](const at::Tensor& h, int64_t i, bool gelu = false) {
      const std::optional<at::Tensor> scale =
          scales.empty() ? std::nullopt : std::optional<at::Tensor>(scales.get(layer * kWeightsPerLayer + i));
      return project(h, w[i], scale, torch_linear, gelu);
    };
    // self-attention: K/V of this step written into the cache, then one query per row over steps 0..step
    auto h = at::layer_norm(x, {dim}, w[kSelfNormWeight], w[kSelfNormBias], eps);
    const auto qkv = proj(h, kQkv).view({batch, 3, num_heads, head_dim});
    const auto layer_k = self_k.select(0, layer), layer_v = self_v.select(0, layer);
    layer_k.select(2, step).copy_(qkv.select(1, 1));
    layer_v.select(2, step).copy_(qkv.select(1, 2));
    auto attended = attend(qkv.select(1, 0), layer_k, layer_v, self_lengths, scale);
    x.add_(proj(attended.view({batch, dim}), kSelfOut));
    // cross-attention over the condition's fixed K/V
    h = at::layer_norm(x, {dim}, w[kCrossNormWeight], w[kCrossNormBias], eps);
    const auto q = proj(h, kCrossQ).view({batch, num_heads, head_dim});
    attended = attend(q, cross_k.select(0, layer), cross_v.select(0, layer), cross_lengths, scale);
    x.add_(proj(attended.view({batch, dim}), kCrossOut));
    // MLP, GELU fused into fc1
    h = at::layer_norm(x, {dim}, w[kMlpNormWeight], w[kMlpNormBias], eps);
    x.add_(proj(proj(h, kFc1, /*gelu=*/true), kFc2));
  }
  return x;
}

}  // namespace
}  // namespace mmdkernels::decode

TORCH_LIBRARY_IMPL(mmdkernels, CPU, m) { m.impl("lm_decode_layers", &mmdkernels::decode::lm_decode_layers_cpu); }
