// One KV-cached decode step through every layer of the MusicGen-style decoder (models/lm.py, DecoderLayer), on the
// CPU, in one call: the same computation as the Python layers' decode path, with the per-op Python overhead (~40
// ops a layer) gone. The heavy parts are this library's own ops, called through the dispatcher:
// mmdkernels::small_batch_linear (every projection, GELU fused into fc1; small_batch_linear_quantized for bfloat16
// or int8 projections, mmdkernels/linear/quantize.py) and mmdkernels::decode_attention (self- and cross-attention);
// the rest is the LayerNorms (each fused with the residual add before it, residual_norm below), a cache write and
// the last residual add.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
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

// x += delta (when defined), then LayerNorm(x) * weight + bias (at::layer_norm's maths: biased variance, eps inside
// the square root), row by row on the calling thread: a decode step's B <= 16 rows of D are too little to share, and
// at::layer_norm, which forks for them, took 3x as long at 2 threads as at 1 on [4, 512] (session 13). Moments in
// double. x: float32 [B, D] contiguous, updated in place; returns h [B, D].
at::Tensor residual_norm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, const at::Tensor& bias,
                         double eps) {
  const int64_t rows = x.size(0), dim = x.size(1);
  at::Tensor h = at::empty_like(x);
  float* xp = x.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  const at::Tensor delta_rows = delta.defined() ? delta.reshape({rows, dim}).contiguous() : delta;
  const float* dp = delta.defined() ? delta_rows.data_ptr<float>() : nullptr;
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    float* row = xp + r * dim;
    if (dp != nullptr) {
      const float* d = dp + r * dim;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) row[i] += d[i];
    }
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < dim; ++i) sum += row[i];
    const double mean = sum / static_cast<double>(dim);
    double squares = 0.0;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < dim; ++i) squares += (row[i] - mean) * (row[i] - mean);
    const double rstd = 1.0 / std::sqrt(squares / static_cast<double>(dim) + eps);
    const float mean_f = static_cast<float>(mean), rstd_f = static_cast<float>(rstd);
    float* out = hp + r * dim;
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) out[i] = (row[i] - mean_f) * rstd_f * wp[i] + bp[i];
  }
  return h;
}

// cache[:, :, step] = qkv[:, part] for qkv float32 [B, 3, H, Dh] contiguous and a cache [B, H, S, Dh] of element type
// T (float32, or a reduced-precision bfloat16 / float16 cache: rounded to nearest even) and any strides: a loop
// instead of a strided copy_ (TensorIterator's set-up cost more than the 32 rows it moves).
template <typename T>
void write_cache_row_as(const at::Tensor& qkv, int64_t part, const at::Tensor& cache, int64_t step) {
  const int64_t batch = cache.size(0), heads = cache.size(1), head_dim = cache.size(3);
  const float* source = qkv.data_ptr<float>() + part * heads * head_dim;
  T* target = cache.data_ptr<T>() + step * cache.stride(2);
  const int64_t sb = cache.stride(0), sh = cache.stride(1), sd = cache.stride(3);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* from = source + (b * 3 + 0) * heads * head_dim + h * head_dim;
      T* to = target + b * sb + h * sh;
      if (sd == 1) {
        for (int64_t d = 0; d < head_dim; ++d) to[d] = static_cast<T>(from[d]);
      } else {
        for (int64_t d = 0; d < head_dim; ++d) to[d * sd] = static_cast<T>(from[d]);
      }
    }
  }
}

void write_cache_row(const at::Tensor& qkv, int64_t part, const at::Tensor& cache, int64_t step) {
  switch (cache.scalar_type()) {
    case at::kBFloat16:
      return write_cache_row_as<c10::BFloat16>(qkv, part, cache, step);
    case at::kHalf:
      return write_cache_row_as<c10::Half>(qkv, part, cache, step);
    default:
      return write_cache_row_as<float>(qkv, part, cache, step);
  }
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
  for (int64_t layer = 0; layer < layers; ++layer) {  // the norms, read through raw pointers by residual_norm
    for (const int64_t index : {kSelfNormWeight, kSelfNormBias, kCrossNormWeight, kCrossNormBias, kMlpNormWeight,
                                kMlpNormBias}) {
      const at::Tensor& norm = weights[layer * kWeightsPerLayer + index];
      TORCH_CHECK(norm.scalar_type() == at::kFloat && norm.device().is_cpu() && norm.dim() == 1 &&
                      norm.size(0) == dim && norm.is_contiguous(),
                  "weights[", layer * kWeightsPerLayer + index, "] (a LayerNorm weight or bias of layer ", layer,
                  ") must be a contiguous float32 CPU tensor [D = ", dim, "], got ", norm.scalar_type(), " ",
                  norm.sizes());
    }
  }
  for (const auto* cache : {&self_k, &self_v}) {  // float32, or a reduced-precision cache (decode_attention reads it)
    TORCH_CHECK(cache->scalar_type() == at::kFloat || cache->scalar_type() == at::kBFloat16 ||
                    cache->scalar_type() == at::kHalf,
                "self_k / self_v must be float32, bfloat16 or float16, got ", cache->scalar_type());
  }
  TORCH_CHECK(self_v.scalar_type() == self_k.scalar_type(), "self_v must have self_k's dtype ", self_k.scalar_type(),
              ", got ", self_v.scalar_type());
  for (const auto* cache : {&cross_k, &cross_v}) MMD_CHECK_DTYPE(*cache, at::kFloat);
  for (const auto* cache : {&self_k, &self_v, &cross_k, &cross_v}) {
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

// The layers of one step on the residual stream x (float32 [B, D] contiguous, updated in place), arguments checked.
// Returns the last layer's MLP output, not yet added to x: the caller adds it (lm_decode_layers) or fuses the add
// into the final norm (lm_decode_logits).
at::Tensor run_layers(at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& scales,
                      const at::Tensor& self_k, const at::Tensor& self_v, const at::Tensor& cross_k,
                      const at::Tensor& cross_v, const at::Tensor& cross_lengths, int64_t step, int64_t num_heads,
                      double eps, bool torch_linear) {
  const int64_t batch = x.size(0), dim = x.size(1), head_dim = dim / num_heads;
  const int64_t layers = static_cast<int64_t>(weights.size()) / kWeightsPerLayer;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const auto self_lengths = at::full({batch}, step + 1, x.options().dtype(at::kLong));
  at::Tensor pending;  // the previous layer's MLP output, added to x by this layer's first residual_norm
  for (int64_t layer = 0; layer < layers; ++layer) {
    const at::Tensor* w = weights.data() + layer * kWeightsPerLayer;
    // projection i of this layer with its scale (int8) or none
    auto proj = [&](const at::Tensor& h, int64_t i, bool gelu = false) {
      const std::optional<at::Tensor> scale =
          scales.empty() ? std::nullopt : std::optional<at::Tensor>(scales.get(layer * kWeightsPerLayer + i));
      return project(h, w[i], scale, torch_linear, gelu);
    };
    // self-attention: K/V of this step written into the cache, then one query per row over steps 0..step
    auto h = residual_norm(x, pending, w[kSelfNormWeight], w[kSelfNormBias], eps);
    const auto qkv = proj(h, kQkv).view({batch, 3, num_heads, head_dim});
    const auto layer_k = self_k.select(0, layer), layer_v = self_v.select(0, layer);
    write_cache_row(qkv, 1, layer_k, step);
    write_cache_row(qkv, 2, layer_v, step);
    auto attended = attend(qkv.select(1, 0), layer_k, layer_v, self_lengths, scale);
    // cross-attention over the condition's fixed K/V
    h = residual_norm(x, proj(attended.view({batch, dim}), kSelfOut), w[kCrossNormWeight], w[kCrossNormBias], eps);
    const auto q = proj(h, kCrossQ).view({batch, num_heads, head_dim});
    attended = attend(q, cross_k.select(0, layer), cross_v.select(0, layer), cross_lengths, scale);
    // MLP, GELU fused into fc1
    h = residual_norm(x, proj(attended.view({batch, dim}), kCrossOut), w[kMlpNormWeight], w[kMlpNormBias], eps);
    pending = proj(proj(h, kFc1, /*gelu=*/true), kFc2);
  }
  return pending;
}

at::Tensor lm_decode_layers_cpu(const at::Tensor& x_in, at::TensorList weights,
                                const c10::List<std::optional<at::Tensor>>& scales, const at::Tensor& self_k,
                                const at::Tensor& self_v, const at::Tensor& cross_k, const at::Tensor& cross_v,
                                const at::Tensor& cross_lengths, int64_t step, int64_t num_heads, double eps,
                                bool torch_linear) {
  check_args(x_in, weights, scales, self_k, self_v, cross_k, cross_v, cross_lengths, step, num_heads);
  at::Tensor x = x_in.contiguous().clone();  // the residual stream, updated in place
  const at::Tensor last = run_layers(x, weights, scales, self_k, self_v, cross_k, cross_v, cross_lengths, step,
                                     num_heads, eps, torch_linear);
  x.add_(last);
  return x;
}

// The step's input embeddings: x[b] = sum_r embedding[tokens[b, r] + offsets[r]] + position, the rows added in
// order r, then the position (the order of models/lm.py's _embed). Every row index is checked before any is read.
at::Tensor embed_tokens(const at::Tensor& tokens, const at::Tensor& offsets, const at::Tensor& embedding,
                        const at::Tensor& position) {
  MMD_CHECK_DIM(tokens, 2);
  MMD_CHECK_DTYPE(tokens, at::kLong);
  MMD_CHECK_DEVICE(tokens, at::Device(at::kCPU));
  MMD_CHECK_DTYPE(offsets, at::kLong);
  const int64_t batch = tokens.size(0), streams = tokens.size(1);
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == streams, "offsets must have shape [R = ", streams,
              "] (one table offset per column of tokens), got ", offsets.sizes());
  MMD_CHECK_DTYPE(embedding, at::kFloat);
  TORCH_CHECK(embedding.dim() == 2 && embedding.is_contiguous(),
              "embedding must be a contiguous float32 tensor [V, D], got ", embedding.sizes());
  const int64_t rows = embedding.size(0), dim = embedding.size(1);
  MMD_CHECK_DTYPE(position, at::kFloat);
  TORCH_CHECK(position.dim() == 1 && position.size(0) == dim && position.stride(0) == 1,
              "position must be a float32 tensor [D = ", dim, "] of unit stride, got ", position.sizes());
  TORCH_CHECK(batch >= 1 && streams >= 1, "tokens must have shape [B, R] with B, R >= 1, got ", tokens.sizes());
  const auto tokens_c = tokens.contiguous(), offsets_c = offsets.contiguous();
  const int64_t* token_data = tokens_c.data_ptr<int64_t>();
  const int64_t* offset_data = offsets_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t r = 0; r < streams; ++r) {
      const int64_t row = token_data[b * streams + r] + offset_data[r];
      TORCH_CHECK(row >= 0 && row < rows, "tokens[", b, ", ", r, "] + offsets[", r, "] = ", row,
                  " is outside the embedding's ", rows, " rows");
    }
  }
  at::Tensor x = at::empty({batch, dim}, embedding.options());
  float* out = x.data_ptr<float>();
  const float* table_data = embedding.data_ptr<float>();
  const float* pos = position.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    float* o = out + b * dim;
    const float* first = table_data + (token_data[b * streams] + offset_data[0]) * dim;
    std::copy(first, first + dim, o);
    for (int64_t r = 1; r < streams; ++r) {
      const float* e = table_data + (token_data[b * streams + r] + offset_data[r]) * dim;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) o[i] += e[i];
    }
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) o[i] += pos[i];
  }
  return x;
}

// A whole decode step of the model, tokens to logits: the embeddings (embed_tokens), the layers (run_layers), the
// final LayerNorm fused with the last residual add, and the heads (one projection over all codebooks' rows).
at::Tensor lm_decode_logits_cpu(const at::Tensor& tokens, const at::Tensor& position, const at::Tensor& embedding,
                                const at::Tensor& offsets, const at::Tensor& final_norm_weight,
                                const at::Tensor& final_norm_bias, const at::Tensor& head,
                                const std::optional<at::Tensor>& head_scale, at::TensorList weights,
                                const c10::List<std::optional<at::Tensor>>& scales, const at::Tensor& self_k,
                                const at::Tensor& self_v, const at::Tensor& cross_k, const at::Tensor& cross_v,
                                const at::Tensor& cross_lengths, int64_t step, int64_t num_heads, double eps,
                                bool torch_linear) {
  at::Tensor x = embed_tokens(tokens, offsets, embedding, position);
  check_args(x, weights, scales, self_k, self_v, cross_k, cross_v, cross_lengths, step, num_heads);
  const int64_t dim = x.size(1);
  for (const auto* norm : {&final_norm_weight, &final_norm_bias}) {
    TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->dim() == 1 && norm->size(0) == dim &&
                    norm->is_contiguous(),
                "final_norm_weight / final_norm_bias must be contiguous float32 tensors [D = ", dim, "], got ",
                norm->scalar_type(), " ", norm->sizes());
  }
  TORCH_CHECK(head.dim() == 2 && head.size(1) == dim && head.is_contiguous(),
              "head must be a contiguous tensor [C, D = ", dim, "], got ", head.sizes());
  const at::Tensor last = run_layers(x, weights, scales, self_k, self_v, cross_k, cross_v, cross_lengths, step,
                                     num_heads, eps, torch_linear);
  const at::Tensor h = residual_norm(x, last, final_norm_weight, final_norm_bias, eps);
  return project(h, head, head_scale, torch_linear);
}

}  // namespace
}  // namespace mmdkernels::decode

TORCH_LIBRARY_IMPL(mmdkernels, CPU, m) {
  m.impl("lm_decode_layers", &mmdkernels::decode::lm_decode_layers_cpu);
  m.impl("lm_decode_logits", &mmdkernels::decode::lm_decode_logits_cpu);
}
