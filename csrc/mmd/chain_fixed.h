// The bandwidth chain of the default bandwidths (0.1, 1, 5, 10, 20, 50; mmdkernels/mmd/plan.py) fixed at compile
// time, and the CPU loops (ChainLoops) that evaluate all six kernels of an entry and use them at once. The
// plan-driven path (bandwidths_chunk, tiles_cpu.h) writes each bandwidth's kernels of a chunk to an array that the
// caller then reads back, once per use: a pass over L1 per bandwidth and use, about half of dHSIC's non-GEMM time.
// A loop over DefaultChain::from_base keeps the six values in registers. Same multiplications in the same order as
// bandwidths_chunk (unrolled_power), so the kernel values are the same; only sums of them may round differently.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/fast_exp.h"
#include "mmd/mmd_tile.h"
#include "mmd/tiles_cpu.h"

namespace mmdkernels {
namespace mmd {

// result * base^P with int_power's multiplications (mmd_tile.h) in its order, unrolled at compile time (the
// compiler does not unroll int_power's shift loop, which would keep a loop over entries from vectorising).
template <int P>
inline float unrolled_power(float result, float base) {
  if constexpr (P == 0) {
    return result;
  } else {
    return unrolled_power<(P >> 1)>((P & 1) ? result * base : result, base * base);
  }
}

// The six kernels of one entry, by name: the loops keep them in registers (an array here, even a local one, kept
// GCC from vectorising the loops over entries).
struct SixKernels {
  float e0, e1, e2, e3, e4, e5;
};

// plan.py's chain for the default bandwidths: coefs 0.01, 0.025, 0.05, 0.1, 0.5, 5 = base 0.005 times
// 2, 5, 10, 20, 100, 1000, reached as v^2, v^5, (v^5)^2, (v^10)^2, (v^20)^5, (v^100)^10.
struct DefaultChain {
  static constexpr int kCount = 6;
  static constexpr int kSrc[kCount] = {kFromBase, kFromBase, 1, 2, 3, 4};
  static constexpr int kStep[kCount] = {2, 5, 2, 2, 5, 10};

  // e_j = exp(-coef_j d) from the base v = exp(-base_coef d): coef_j = base_coef * (2, 5, 10, 20, 100, 1000)_j
  static SixKernels from_base(float v) {
    SixKernels k;
    k.e0 = unrolled_power<2>(1.0f, v);
    k.e1 = unrolled_power<5>(1.0f, v);
    k.e2 = unrolled_power<2>(1.0f, k.e1);
    k.e3 = unrolled_power<2>(1.0f, k.e2);
    k.e4 = unrolled_power<5>(1.0f, k.e3);
    k.e5 = unrolled_power<10>(1.0f, k.e4);
    return k;
  }
};

// v[m] = exp(-base_coef d[m]), the chain's base, for m < len <= kChunk. The loops take the base from here rather than
// evaluate it inline: an entry's exp and chain are a long dependent sequence (~20 operations deep), and in one loop
// the core overlaps too few entries to hide it; as two loops the same work ran 1.8x as fast (Zen 3, AVX2).
inline void chain_bases(const float* d, float base_coef, float* v, int64_t len) {
#pragma omp simd
  for (int64_t m = 0; m < len; ++m) v[m] = fast_exp(-base_coef * d[m]);
}

// Whether `plan` is Chain's (any base coefficient): callers take the fixed loops then, else the plan-driven ones.
template <class Chain>
inline bool plan_is(const BandwidthPlan& plan) {
  if (plan.count != Chain::kCount || !(plan.base_coef > 0.0f)) return false;
  for (int j = 0; j < Chain::kCount; ++j) {
    if (plan.src[j] != Chain::kSrc[j] || plan.step[j] != Chain::kStep[j]) return false;
  }
  return true;
}

// MMDKERNELS_MMD_CHAIN=plan forces the plan-driven chunk loops for every plan (read at every call, so tests can
// compare the two); auto (the default): ChainLoops wherever the plan is the default bandwidths' chain.
inline constexpr const char* kChainEnv = "MMDKERNELS_MMD_CHAIN";

inline bool use_fixed_chain(const BandwidthPlan& plan) {
  const char* env = std::getenv(kChainEnv);
  const std::string mode = env == nullptr || *env == '\0' ? "auto" : env;
  TORCH_CHECK(mode == "auto" || mode == "plan", kChainEnv, " must be one of auto, plan; got '", mode, "'");
  return mode == "auto" && plan_is<DefaultChain>(plan);
}

// The CPU passes' loops over one chunk of a row (len <= kChunk) with Chain's bandwidths: every kernel of an entry
// evaluated, summed and weighted in registers, in one loop over the chunk after the loop over the bases. The callers
// (dhsic_cpu.cpp, mmd_cpu.cpp) take the plan-driven chunk loops (bandwidths_chunk) for other plans.
template <class Chain>
struct ChainLoops {
  static_assert(Chain::kCount == 6, "the loops below name six kernels (SixKernels)");

  // dHSIC pass 1, a codebook's distances (or a group's): sums[j] = sum_m E_j(d[m]); with columns (a codebook of a
  // mirrored tile), columns[j][m] += E_j(d[m]).
  template <bool kColumns>
  static void row_sums(const float* d, float base_coef, float* const* columns, float* sums, int64_t len) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f, s4 = 0.0f, s5 = 0.0f;
    float *c0 = nullptr, *c1 = nullptr, *c2 = nullptr, *c3 = nullptr, *c4 = nullptr, *c5 = nullptr;
    if constexpr (kColumns) {
      c0 = columns[0], c1 = columns[1], c2 = columns[2], c3 = columns[3], c4 = columns[4], c5 = columns[5];
    }
    alignas(64) float v[kChunk];
    chain_bases(d, base_coef, v, len);
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5)
    for (int64_t m = 0; m < len; ++m) {
      const SixKernels e = Chain::from_base(v[m]);
      s0 += e.e0, s1 += e.e1, s2 += e.e2, s3 += e.e3, s4 += e.e4, s5 += e.e5;
      if constexpr (kColumns) {
        c0[m] += e.e0, c1[m] += e.e1, c2[m] += e.e2, c3[m] += e.e3, c4[m] += e.e4, c5[m] += e.e5;
      }
    }
    sums[0] = s0, sums[1] = s1, sums[2] = s2, sums[3] = s3, sums[4] = s4, sums[5] = s5;
  }

  // A group's slope (dHSIC pass 2; the shuffle's with negated coefs): slope[m] = sum_j coef_j E_j(d[m]); with
  // kAddValue (the shuffle's loss), also value[m] += sum_j E_j(d[m]).
  template <bool kAddValue>
  static void slope(const float* d, float base_coef, const float* coef, float* slope, float* value, int64_t len) {
    const float k0 = coef[0], k1 = coef[1], k2 = coef[2], k3 = coef[3], k4 = coef[4], k5 = coef[5];
    alignas(64) float v[kChunk];
    chain_bases(d, base_coef, v, len);
#pragma omp simd
    for (int64_t m = 0; m < len; ++m) {
      const SixKernels e = Chain::from_base(v[m]);
      slope[m] = k0 * e.e0 + k1 * e.e1 + k2 * e.e2 + k3 * e.e3 + k4 * e.e4 + k5 * e.e5;
      if constexpr (kAddValue) value[m] += ((e.e0 + e.e1) + (e.e2 + e.e3)) + (e.e4 + e.e5);
    }
  }

  // dHSIC pass 2, codebook k: weights[m] = slope_scale * slope[m] - sum_j E_j(d[m]) (a[j] - b[j][m]), 0 where d[m] = 0;
  // returns their sum and, with a column side, adds them to columns[m].
  template <bool kColumns>
  static float weights(const float* d, float base_coef, float slope_scale, const float* slope, const float* a,
                       const float* const* b, float* weights, float* columns, int64_t len) {
    const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], a4 = a[4], a5 = a[5];
    const float *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3], *b4 = b[4], *b5 = b[5];
    float s = 0.0f;
    alignas(64) float v[kChunk];
    chain_bases(d, base_coef, v, len);
#pragma omp simd reduction(+ : s)
    for (int64_t m = 0; m < len; ++m) {
      const SixKernels e = Chain::from_base(v[m]);
      float w = slope_scale * slope[m];
      w -= e.e0 * (a0 - b0[m]);
      w -= e.e1 * (a1 - b1[m]);
      w -= e.e2 * (a2 - b2[m]);
      w -= e.e3 * (a3 - b3[m]);
      w -= e.e4 * (a4 - b4[m]);
      w -= e.e5 * (a5 - b5[m]);
      w = d[m] == 0.0f ? 0.0f : w;  // duplicates: a - b = 0
      weights[m] = w;
      s += w;
      if constexpr (kColumns) columns[m] += w;
    }
    return s;
  }
};

}  // namespace mmd
}  // namespace mmdkernels
