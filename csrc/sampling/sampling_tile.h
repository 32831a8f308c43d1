// Per-token maths of the fused sampler, shared by the C++ CPU kernel (sampling_cpu.cpp) and the CUDA kernel
// (sampling_cuda.cu) so that both mix, scale, rank and keep tokens bit-for-bit like the spec
// (mmdkernels/sampling/reference.py): CFG and temperature in float32 with one rounding per operation (no FMA
// contraction), the order key that ranks tokens by (z descending, index ascending), and the kept-set test against a
// boundary token. Plain C++ (no CUDA headers); every function is __host__ __device__ under nvcc.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SAMPLING_HD __host__ __device__ __forceinline__
#else
#define SAMPLING_HD inline
#endif

namespace mmdkernels {
namespace sampling {

// Row returned for a row with NaN/+inf logits or only -inf logits (the Python layer raises on it).
constexpr int64_t kInvalidToken = -1;

// Exactly rounded float32 arithmetic: nvcc contracts a * b + c into an FMA (and --use_fast_math would not
// change these), which would round differently from PyTorch's separate multiply and add.
SAMPLING_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SAMPLING_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
SAMPLING_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// NaN or +inf: a logit no distribution can be made of.
SAMPLING_HD bool is_bad_logit(float x) { return !(x < INFINITY); }

// The guided logit uncond + c (cond - uncond); -inf in either branch stays -inf (a ban is kept), NaN/+inf in either
// branch gives NaN (the row is invalid). Without CFG, cond itself.
// Branch-free, so that CPU loops over it vectorise.
SAMPLING_HD float mixed_logit(float cond, float uncond, float cfg_coef, bool use_cfg) {
  const float mix = add_rn(uncond, mul_rn(cfg_coef, sub_rn(cond, uncond)));
  const bool bad = is_bad_logit(cond) | is_bad_logit(uncond);
  const bool banned = (cond == -INFINITY) | (uncond == -INFINITY);
  return !use_cfg ? cond : bad ? NAN : banned ? -INFINITY : mix;
}

// z = x * float32(1 / T), with -0 made +0 so that the order key ranks equal floats as equal.
SAMPLING_HD float scaled_logit(float x, float inv_temperature) {
  const float z = mul_rn(x, inv_temperature);
  return z == 0.0f ? 0.0f : z;
}

// Monotone map float -> uint32 (a < b iff key(a) < key(b) for non-NaN floats; +0 and -0 differ, so callers pass
// scaled_logit's canonical zero).
SAMPLING_HD uint32_t order_key(float z) {
  uint32_t bits;
  memcpy(&bits, &z, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Rank key: larger means ranked earlier, i.e. (z descending, index ascending). Index i of a V-token row is stored
// as V - 1 - i so that the lower index has the larger key.
SAMPLING_HD uint64_t rank_key(float z, int64_t index, int64_t num_tokens) {
  return (static_cast<uint64_t>(order_key(z)) << 32) | static_cast<uint64_t>(num_tokens - 1 - index);
}

// The token at rank key `key`: its vocabulary index.
SAMPLING_HD int64_t index_of_key(uint64_t key, int64_t num_tokens) {
  return num_tokens - 1 - static_cast<int64_t>(key & 0xffffffffu);
}

// float32(1 / T): every backend scales by the same float, an exactly rounded multiply.
SAMPLING_HD float inverse_temperature(double temperature) { return static_cast<float>(1.0 / temperature); }

// top-k is active when it removes something.
SAMPLING_HD bool top_k_active(int64_t top_k, int64_t num_tokens) { return top_k > 0 && top_k < num_tokens; }

}  // namespace sampling
}  // namespace mmdkernels
