// Online-softmax arithmetic of KV-cached decode attention, shared by the C++ CPU kernel (attention_cpu.cpp) and the
// CUDA kernel (attention_cuda.cu) so that both follow one recipe: a running (max score, sum of exp(score - max)) per
// query head, the factor that rescales the unnormalised output accumulator when the max rises, the merge of two
// partial results over disjoint key ranges (the combine step of split-K flash-decoding), and the split of a
// sequence's valid keys into contiguous ranges. Plain C++ (no CUDA headers); __host__ __device__ under nvcc.
// Everything is float32: the caller accumulates sum_s exp(score_s - max) * v_s and divides by `sum` at the end.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ATTN_HD __host__ __device__ __forceinline__
#else
#define ATTN_HD inline
#endif

namespace mmdkernels {
namespace attention {

// Softmax statistics of the keys seen so far: max score and sum of exp(score - max_score).
struct SoftmaxState {
  float max_score;
  float sum;
};

ATTN_HD SoftmaxState empty_state() { return {-INFINITY, 0.0f}; }

// Raises the running max to cover a block whose largest score is block_max. Returns the factor the caller multiplies
// its accumulator by (the sum is rescaled here); 1 when the max does not rise, 0 when nothing was seen before.
ATTN_HD float raise_max(SoftmaxState& state, float block_max) {
  if (!(block_max > state.max_score)) return 1.0f;
  const float factor = expf(state.max_score - block_max);  // exp(-inf) = 0 for an empty state
  state.sum *= factor;
  state.max_score = block_max;
  return factor;
}

// The unnormalised softmax weight of one score under the current max (call raise_max for its block first).
ATTN_HD float softmax_weight(const SoftmaxState& state, float score) { return expf(score - state.max_score); }

// Merges partial b into a (disjoint key ranges): returns a's new state and the factors that scale a's and b's
// accumulators into the merged one. An empty partial (no keys) gets factor 0 and changes nothing.
ATTN_HD SoftmaxState merge_states(const SoftmaxState& a, const SoftmaxState& b, float* factor_a, float* factor_b) {
  const float max_score = fmaxf(a.max_score, b.max_score);
  if (max_score == -INFINITY) {
    *factor_a = 0.0f;
    *factor_b = 0.0f;
    return empty_state();
  }
  *factor_a = expf(a.max_score - max_score);
  *factor_b = expf(b.max_score - max_score);
  return {max_score, a.sum * *factor_a + b.sum * *factor_b};
}

// 1 / sum, or 0 for a sequence with no valid key (possible only when a caller skips the length check): the output is
// then 0 rather than NaN.
ATTN_HD float inverse_sum(const SoftmaxState& state) { return state.sum > 0.0f ? 1.0f / state.sum : 0.0f; }

// Number of cache entries a query may read: lengths[b] clamped to [0, max_len], so a bad length never reads out of
// the cache.
ATTN_HD int64_t valid_length(int64_t length, int64_t max_len) {
  return length < 0 ? 0 : (length > max_len ? max_len : length);
}

// Keys [*begin, *end) of split `split` out of `num_splits` contiguous, equal (up to one block) ranges of [0, length).
ATTN_HD void split_range(int64_t length, int64_t num_splits, int64_t split, int64_t* begin, int64_t* end) {
  const int64_t chunk = (length + num_splits - 1) / num_splits;
  *begin = split * chunk < length ? split * chunk : length;
  *end = *begin + chunk < length ? *begin + chunk : length;
}

}  // namespace attention
}  // namespace mmdkernels
