// KV-cached decode attention on the CPU (spec: mmdkernels/attention/reference.py), flash-decoding style. A work item
// is one (sequence, KV head, key range): it streams its keys once in blocks of kBlock, dots every key with the
// H / H_kv query heads that share it (grouped-query attention reuses each loaded key and value row), folds the
// block's scores into a running softmax (attention_tile.h) and accumulates exp-weighted value rows. When there are
// fewer (sequence, KV head) pairs than threads, long key ranges are split and a combine pass merges the partials.
// Caches are read in place through their strides (rows must be contiguous); arithmetic is float32 in any dtype. The
// caches may be bfloat16 or float16 under a float32 q (a reduced-precision cache: half the bytes a step streams).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12 warns about uninitialised variables inside its own AVX-512 headers (masked loads): a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <vector>

#include "attention/attention_checks.h"
#include "attention/attention_tile.h"
#include "common/checks.h"
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__))
#include <utility>

#include "linear/linear_vec.h"
#endif

namespace mmdkernels {
namespace attention {
namespace {

// Keys scored before each softmax update (the scores, group * kBlock floats, stay in L1/L2). Long blocks read K and
// V in long sequential runs, which the hardware prefetchers follow. Measured on an AMD EPYC Zen 3 (benchmarks/
// RESULTS.md, session 22) against blocks of 64 keys with the next block prefetched in software (a burst of line
// requests per block, which also cost instructions: 1.1-1.5x slower even from L3): whole decode steps at 500-1500
// cached entries took 0.87-0.94x the time (level at 30 entries), the op alone from memory 0.65-0.8x.
constexpr int64_t kBlock = 1024;
constexpr int64_t kMinSplitKeys = 256;   // a split below this many keys costs more in combining than it gains
constexpr int64_t kItemsPerThread = 4;   // split until there are this many work items per thread (load balance)

// exp(x) for x <= 0 (scores minus their running max), vectorisable: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its
// degree-6 Taylor polynomial (relative error < 2e-7), 2^n by building the float's exponent bits. Below -87 (where
// exp underflows float32) it returns about 1e-38 instead of 0: negligible next to the max key's weight of 1.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 split in two for an exact n * ln2_high
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// Strided [B, H_kv, S_max, Dh] cache with contiguous rows.
template <typename T>
struct CacheView {
  const T* data;
  int64_t batch_stride, head_stride, pos_stride;
  const T* row(int64_t b, int64_t g, int64_t s) const {
    return data + b * batch_stride + g * head_stride + s * pos_stride;
  }
};

template <typename T>
CacheView<T> cache_view(const at::Tensor& cache) {
  return {cache.data_ptr<T>(), cache.stride(0), cache.stride(1), cache.stride(2)};
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// 16 lanes of a row as float32 (lanes outside `mask` read as 0 and are not touched in memory). GCC does not
// vectorise c10::Half's scalar conversion, and bfloat16's only poorly, hence the explicit conversions.
inline __m512 load_floats(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load_floats(const c10::BFloat16* p, __mmask16 mask) {
  const __m512i widened = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(widened, 16));  // bfloat16 is the top half of a float32
}
inline __m512 load_floats(const c10::Half* p, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}
inline __mmask16 lanes_from(int64_t d, int64_t dim) {
  return dim - d >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (dim - d)) - 1);
}

// scores[j] = q . keys[j] for the n keys keys + j * stride. Four keys at a time share each load of q.
template <typename T>
inline void score_keys(const float* q, const T* keys, int64_t stride, int64_t n, int64_t dim, float* scores) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* k = keys + j * stride;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t d = 0; d < dim; d += 16) {
      const __mmask16 mask = lanes_from(d, dim);
      const __m512 qd = _mm512_maskz_loadu_ps(mask, q + d);
      s0 = _mm512_fmadd_ps(qd, load_floats(k + d, mask), s0);
      s1 = _mm512_fmadd_ps(qd, load_floats(k + stride + d, mask), s1);
      s2 = _mm512_fmadd_ps(qd, load_floats(k + 2 * stride + d, mask), s2);
      s3 = _mm512_fmadd_ps(qd, load_floats(k + 3 * stride + d, mask), s3);
    }
    scores[j] = _mm512_reduce_add_ps(s0);
    scores[j + 1] = _mm512_reduce_add_ps(s1);
    scores[j + 2] = _mm512_reduce_add_ps(s2);
    scores[j + 3] = _mm512_reduce_add_ps(s3);
  }
  for (; j < n; ++j) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
      const __mmask16 mask = lanes_from(d, dim);
      sum = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, q + d), load_floats(keys + j * stride + d, mask), sum);
    }
    scores[j] = _mm512_reduce_add_ps(sum);
  }
}

// acc += sum_j weights[j] * values[j] for the n values values + j * stride; each 16-lane slice of acc stays in a
// register through all n values.
template <typename T>
inline void accumulate_values(float* acc, const float* weights, const T* values, int64_t stride, int64_t n,
                              int64_t dim) {
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 mask = lanes_from(d, dim);
    __m512 sum = _mm512_maskz_loadu_ps(mask, acc + d);
    for (int64_t j = 0; j < n; ++j) {
      sum = _mm512_fmadd_ps(_mm512_set1_ps(weights[j]), load_floats(values + j * stride + d, mask), sum);
    }
    _mm512_mask_storeu_ps(acc + d, mask, sum);
  }
}
#else
// Without AVX-512 (AVX2 CPUs: the build's 8-lane registers through GCC's vector extensions, linear/linear_vec.h):
// the same structure as above. kLanes keys at a time share each load of q and are summed across lanes by one
// transpose tree; a value row slice of up to kHeldVectors vectors stays in registers through all n values. The scalar
// loops this replaced summed one key at a time across lanes and kept acc in memory: 1.6-2.8x slower on AMD Zen 3.
using linear::kLanes;
using linear::Vec;
constexpr int kHeldVectors = 8;  // 64 float32 with AVX2: a whole 64-wide head row, with room for w and one value

inline Vec load_floats(const float* p) { return linear::load_floats(p); }
inline Vec load_floats(const c10::BFloat16* p) { return linear::load_weights(reinterpret_cast<const uint16_t*>(p)); }
inline Vec load_floats(const c10::Half* p) {
#if defined(__F16C__) && !defined(__AVX512F__)  // kLanes == 8
  return (Vec)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  Vec v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// scores[j] = q . keys[j] for the n keys keys + j * stride.
template <typename T>
inline void score_keys(const float* q, const T* keys, int64_t stride, int64_t n, int64_t dim, float* scores) {
  const int64_t vectors = dim - dim % kLanes;
  auto tail = [&](int64_t j) {  // the columns past the last whole vector
    float sum = 0.0f;
    for (int64_t d = vectors; d < dim; ++d) sum += q[d] * static_cast<float>(keys[j * stride + d]);
    return sum;
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    Vec acc[kLanes];
#pragma GCC unroll 16
    for (int i = 0; i < kLanes; ++i) acc[i] = Vec{};
    for (int64_t d = 0; d < vectors; d += kLanes) {
      const Vec qd = load_floats(q + d);
#pragma GCC unroll 16
      for (int i = 0; i < kLanes; ++i) acc[i] += qd * load_floats(keys + (j + i) * stride + d);
    }
    linear::lane_sums<kLanes>(acc, scores + j);
    if (vectors < dim)
      for (int i = 0; i < kLanes; ++i) scores[j + i] += tail(j + i);
  }
  for (; j < n; ++j) {
    Vec acc[1] = {Vec{}};
    for (int64_t d = 0; d < vectors; d += kLanes) acc[0] += load_floats(q + d) * load_floats(keys + j * stride + d);
    linear::lane_sums<1>(acc, scores + j);
    scores[j] += tail(j);
  }
}

// acc[0, C * kLanes) += sum_j weights[j] * values[j][0, C * kLanes), the C vectors of acc in registers throughout.
template <int C, typename T>
inline void accumulate_slice(float* acc, const float* weights, const T* values, int64_t stride, int64_t n) {
  Vec sum[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) sum[c] = load_floats(acc + c * kLanes);
  for (int64_t j = 0; j < n; ++j) {
    const Vec w = Vec{} + weights[j];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) sum[c] += w * load_floats(values + j * stride + c * kLanes);
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) linear::store_floats(acc + c * kLanes, sum[c]);
}

template <typename T, int... Cs>
inline void accumulate_vectors(int count, float* acc, const float* weights, const T* values, int64_t stride,
                               int64_t n, std::integer_sequence<int, Cs...>) {
  ((count == Cs + 1 ? accumulate_slice<Cs + 1>(acc, weights, values, stride, n) : void()), ...);
}

// acc += sum_j weights[j] * values[j] for the n values values + j * stride.
template <typename T>
inline void accumulate_values(float* acc, const float* weights, const T* values, int64_t stride, int64_t n,
                              int64_t dim) {
  const int64_t vectors = dim / kLanes;
  for (int64_t v = 0; v < vectors; v += kHeldVectors) {
    const int count = static_cast<int>(std::min<int64_t>(kHeldVectors, vectors - v));
    accumulate_vectors(count, acc + v * kLanes, weights, values + v * kLanes, stride, n,
                       std::make_integer_sequence<int, kHeldVectors>{});
  }
  for (int64_t d = vectors * kLanes; d < dim; ++d) {
    float sum = acc[d];
    for (int64_t j = 0; j < n; ++j) sum += weights[j] * static_cast<float>(values[j * stride + d]);
    acc[d] = sum;
  }
}
#endif

// Scales row[0, n) in place and returns its largest value, 8 lanes at a time (GCC's vector extensions, any x86-64
// build): std::max_element's scalar compare chain had been ~8 % of the kernel's samples (perf, session 22), and
// GCC does not vectorise a float max reduction without -ffinite-math-only.
inline float scale_and_max(float* row, int64_t n, float scale) {
  using Lanes = float __attribute__((vector_size(32)));
  Lanes best = Lanes{} - INFINITY;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    Lanes x;
    std::memcpy(&x, row + j, sizeof(x));
    x *= scale;
    std::memcpy(row + j, &x, sizeof(x));
    best = best > x ? best : x;
  }
  float largest = best[0];
  for (int l = 1; l < 8; ++l) largest = std::max(largest, best[l]);
  for (; j < n; ++j) {
    row[j] *= scale;
    largest = std::max(largest, row[j]);
  }
  return largest;
}

// Attention of the `group` query heads q [group, dim] (pre-scaled, float32) over keys [begin, end) of one
// (sequence, KV head). Leaves the unnormalised accumulator in acc [group, dim] and the statistics in states.
template <typename T>
void attend_range(const float* q, float scale, int64_t group, const CacheView<T>& k, const CacheView<T>& v, int64_t b,
                  int64_t g, int64_t begin, int64_t end, int64_t dim, float* acc, SoftmaxState* states, float* scores) {
  std::fill(acc, acc + group * dim, 0.0f);
  std::fill(states, states + group, empty_state());
  for (int64_t s0 = begin; s0 < end; s0 += kBlock) {
    const int64_t n = std::min(kBlock, end - s0);
    for (int64_t h = 0; h < group; ++h) {
      score_keys(q + h * dim, k.row(b, g, s0), k.pos_stride, n, dim, scores + h * kBlock);
    }
    for (int64_t h = 0; h < group; ++h) {
      float* row = scores + h * kBlock;
      const float block_max = scale_and_max(row, n, scale);
      const float factor = raise_max(states[h], block_max);
      if (factor != 1.0f) {
        for (int64_t d = 0; d < dim; ++d) acc[h * dim + d] *= factor;
      }
      const float max_score = states[h].max_score;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        row[j] = exp_nonpositive(row[j] - max_score);
        sum += row[j];
      }
      states[h].sum += sum;
    }
    for (int64_t h = 0; h < group; ++h) {
      accumulate_values(acc + h * dim, scores + h * kBlock, v.row(b, g, s0), v.pos_stride, n, dim);
    }
  }
}

// Splits per (sequence, KV head) so that every thread gets work when B * H_kv is small and the keys are many.
int64_t choose_splits(int64_t pairs, int64_t max_length) {
  const int64_t wanted = (kItemsPerThread * at::get_num_threads() + pairs - 1) / pairs;
  const int64_t most = std::max<int64_t>(1, max_length / kMinSplitKeys);
  return std::max<int64_t>(1, std::min(wanted, most));
}

// T: the caches' element type; O: the output's (q's dtype: T, or float32 over a bfloat16 / float16 cache).
template <typename T, typename O>
void decode_attention_kernel(const at::Tensor& q_float, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& lengths, float scale, at::Tensor& out) {
  const int64_t batch = q_float.size(0), heads = q_float.size(1), dim = q_float.size(2);
  const int64_t kv_heads = k_cache.size(1), max_len = k_cache.size(2), group = heads / kv_heads;
  const auto k = cache_view<T>(k_cache), v = cache_view<T>(v_cache);
  const float* q = q_float.data_ptr<float>();
  const int64_t q_batch_stride = q_float.stride(0);  // heads and elements are packed (decode_attention_cpu)
  const int64_t* length_data = lengths.data_ptr<int64_t>();
  O* out_data = out.data_ptr<O>();
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) longest = std::max(longest, valid_length(length_data[b], max_len));
  const int64_t splits = choose_splits(batch * kv_heads, longest);
  const int64_t items = batch * kv_heads * splits;
  // Partials of every split: unnormalised accumulators [items, group, dim] and states [items, group].
  std::vector<float> partial_acc(splits > 1 ? items * group * dim : 0);
  std::vector<SoftmaxState> partial_states(splits > 1 ? items * group : 0);

  at::parallel_for(0, items, 1, [&](int64_t first, int64_t last) {
    std::vector<float> acc(group * dim), scores(group * kBlock);
    std::vector<SoftmaxState> states(group);
    for (int64_t item = first; item < last; ++item) {
      const int64_t pair = item / splits, split = item % splits, b = pair / kv_heads, g = pair % kv_heads;
      int64_t begin, end;
      split_range(valid_length(length_data[b], max_len), splits, split, &begin, &end);
      const float* q_group = q + b * q_batch_stride + g * group * dim;
      attend_range(q_group, scale, group, k, v, b, g, begin, end, dim, acc.data(), states.data(), scores.data());
      if (splits > 1) {
        std::copy(acc.begin(), acc.end(), partial_acc.begin() + item * group * dim);
        std::copy(states.begin(), states.end(), partial_states.begin() + item * group);
        continue;
      }
      for (int64_t h = 0; h < group; ++h) {
        const float inverse = inverse_sum(states[h]);
        O* o = out_data + (b * heads + g * group + h) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<O>(acc[h * dim + d] * inverse);
      }
    }
  });
  if (splits == 1) return;

  // Combine: merge the splits of each (sequence, query head) in order, then normalise.
  at::parallel_for(0, batch * heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> merged(dim);
    for (int64_t row = first; row < last; ++row) {
      const int64_t pair = row / group, h = row % group;  // row = b * heads + g * group + h, pair = b * kv_heads + g
      SoftmaxState state = empty_state();
      std::fill(merged.begin(), merged.end(), 0.0f);
      for (int64_t split = 0; split < splits; ++split) {
        const int64_t at = (pair * splits + split) * group + h;
        float factor_merged, factor_split;
        state = merge_states(state, partial_states[at], &factor_merged, &factor_split);
        const float* part = partial_acc.data() + at * dim;
        for (int64_t d = 0; d < dim; ++d) merged[d] = merged[d] * factor_merged + part[d] * factor_split;
      }
      const float inverse = inverse_sum(state);
      O* o = out_data + row * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<O>(merged[d] * inverse);
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& lengths) {
  MMD_CHECK_DEVICE(q, at::Device(at::kCPU));
  mmdkernels::attention::check_decode_attention_args(q, k_cache, v_cache, lengths, /*reduced_cache=*/true);
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& lengths, double scale) {
  check_inputs(q, k_cache, v_cache, lengths);
  // Rows must be contiguous to be read as vectors; any other strides are followed in place.
  const auto k = k_cache.stride(3) == 1 ? k_cache : k_cache.contiguous();
  const auto v = v_cache.stride(3) == 1 ? v_cache : v_cache.contiguous();
  // exact: the kernels scale the scores, not q. A float32 q whose heads are packed rows is read in place whatever
  // its batch stride (a decode step's q is a slice of its fused QKV projection: no copy per call).
  const bool packed_heads = q.scalar_type() == at::kFloat && q.stride(2) == 1 && q.stride(1) == q.size(2);
  const auto q_float = packed_heads ? q : q.to(at::kFloat).contiguous();
  const auto lengths_c = lengths.contiguous();
  auto out = at::empty(q.sizes(), q.options());
  // The caches' dtype: q's, or bfloat16 / float16 under a float32 q (a reduced-precision cache, read as float32)
  const auto cache_dtype = k.scalar_type();
  const float scale_f = static_cast<float>(scale);
  if (cache_dtype == at::kFloat) {
    decode_attention_kernel<float, float>(q_float, k, v, lengths_c, scale_f, out);
  } else if (cache_dtype == at::kBFloat16) {
    if (q.scalar_type() == at::kFloat) {
      decode_attention_kernel<c10::BFloat16, float>(q_float, k, v, lengths_c, scale_f, out);
    } else {
      decode_attention_kernel<c10::BFloat16, c10::BFloat16>(q_float, k, v, lengths_c, scale_f, out);
    }
  } else if (q.scalar_type() == at::kFloat) {
    decode_attention_kernel<c10::Half, float>(q_float, k, v, lengths_c, scale_f, out);
  } else {
    decode_attention_kernel<c10::Half, c10::Half>(q_float, k, v, lengths_c, scale_f, out);
  }
  return out;
}

}  // namespace
}  // namespace attention
}  // namespace mmdkernels

TORCH_LIBRARY_IMPL(mmdkernels, CPU, m) { m.impl("decode_attention", &mmdkernels::attention::decode_attention_cpu); }
