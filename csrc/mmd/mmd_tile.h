// Tile maths of the fused MMD loss, shared by the C++ CPU kernels (*_cpu.cpp) and the CUDA kernels (tiles_cuda.h).
// Everything here is a __host__ __device__ function on scalars, so the CPU tests exercise the same arithmetic
// that the GPU runs: squared distance from a dot product, the fast exp, the multi-bandwidth chain (one exp per
// entry, the other bandwidths by integer powers), and the per-entry loss/gradient weights of both estimators.
// All arithmetic is float32; callers accumulate sums in double (CPU) or in float partials reduced per block (GPU).
#pragma once

#include <cstdint>

#include "common/fast_exp.h"

#if defined(__CUDACC__)
#define MMD_HD __host__ __device__ __forceinline__
#else
#define MMD_HD inline
#endif

namespace mmdkernels {
namespace mmd {

constexpr int kMaxBandwidths = 8;
constexpr int kMaxCodebooks = 32;
// Largest chain step (a power of an earlier bandwidth or of the base): MAX_CHAIN_POWER in mmdkernels/mmd/plan.py.
constexpr int kMaxChainPower = 1024;
// src value of a bandwidth that is evaluated by its own exp instead of a power of an earlier one.
constexpr int kDirectExp = -2;
// src value of a bandwidth that is a power of the chain's base v = exp(-base_coef * d).
constexpr int kFromBase = -1;

// How to evaluate exp(-coef_j * d) for all bandwidths j of one entry (built in Python: mmdkernels/mmd/plan.py).
// Bandwidths are sorted by coef ascending. When every coef_j is an integer multiple p_j of a common base_coef,
// e_j = e_src^step_j with src an earlier bandwidth (or the base): one exp per entry plus a few multiplies.
// On a GPU the exp unit, not the FMA pipe, bounds this loss, so this is what makes the kernel fast there.
struct BandwidthPlan {
  int count;
  float base_coef;
  float coef[kMaxBandwidths];
  int src[kMaxBandwidths];
  int step[kMaxBandwidths];
};

// fast_exp: common/fast_exp.h (the host version vectorises; the hardware __expf on the device).

MMD_HD float int_power(float base, int exponent) {
  float result = 1.0f;
  while (exponent > 0) {
    if (exponent & 1) result *= base;
    base *= base;
    exponent >>= 1;
  }
  return result;
}

// Squared distance from norms and a dot product, clamped at 0 (cancellation can make it slightly negative).
MMD_HD float sqdist_from_dot(float norm_a, float norm_b, float dot) {
  const float d = norm_a + norm_b - 2.0f * dot;
  return d > 0.0f ? d : 0.0f;
}

// dHSIC gradient weight of codebook k at entry (n, m), symmetrised over (n, m) and (m, n), for one bandwidth:
//   W_k = -coef * [ (2/N^2) sum_{g contains k} joint_g  +  E_k (2 gamma_k - beta_k(n) - beta_k(m)) ]
// with joint_g = prod_{j in g} E_j, gamma_k = (1/N^2) sum_{g contains k} prod_{j in g, j != k} s_j and
// beta_k(n) = (2/N^2) sum_{g contains k} prod_{j in g, j != k} rbar_j(n)  (s_j: mean of E_j, rbar_j: its row mean).
// Then grad z_n^k = 2 sum_m W_k(n, m) (z_n^k - z_m^k).
MMD_HD float dhsic_entry_weight(float coef, float inv_n2, float joint_sum_k, float gram_k, float gamma_k,
                                float beta_k_row, float beta_k_col) {
  return -coef * (2.0f * inv_n2 * joint_sum_k + gram_k * (2.0f * gamma_k - beta_k_row - beta_k_col));
}

// e[j] = exp(-plan.coef[j] * d) for every bandwidth, by the plan's chain. Every array index is a compile-time
// constant once the loops are unrolled (e[src] becomes a select over the earlier bandwidths), so on a GPU e[]
// stays in registers instead of local memory.
#if defined(__CUDACC__)
#define MMD_UNROLL _Pragma("unroll")
#else
#define MMD_UNROLL
#endif

MMD_HD void eval_bandwidths(float d, const BandwidthPlan& plan, float* e) {
  const float base = plan.base_coef > 0.0f ? fast_exp(-plan.base_coef * d) : 0.0f;
  MMD_UNROLL
  for (int j = 0; j < kMaxBandwidths; ++j) {
    if (j >= plan.count) break;
    const int src = plan.src[j];
    if (src == kDirectExp) {
      e[j] = fast_exp(-plan.coef[j] * d);
    } else {
      float from = base;
      MMD_UNROLL
      for (int i = 0; i < j; ++i) from = src == i ? e[i] : from;
      e[j] = int_power(from, plan.step[j]);
    }
  }
}

// Shuffle estimator, one entry of one group: value += w * sum_j e_j and slope += w * sum_j (-coef_j) e_j,
// where slope is d(value)/d(D_g), the weight the gradient GEMM multiplies the distance derivative with.
MMD_HD void shuffle_entry(float group_dist, const BandwidthPlan& plan, float weight, float* value,
                                   float* slope) {
  float e[kMaxBandwidths];
  eval_bandwidths(group_dist, plan, e);
  float v = 0.0f, s = 0.0f;
  MMD_UNROLL
  for (int j = 0; j < kMaxBandwidths; ++j) {
    if (j >= plan.count) break;
    v += e[j];
    s -= plan.coef[j] * e[j];
  }
  *value += weight * v;
  *slope += weight * s;
}

}  // namespace mmd
}  // namespace mmdkernels
