// exp(x) for x <= 0, shared by the Gaussian kernels of the MMD loss (mmd/mmd_tile.h, host and device) and the GELU
// of the few-row linear (linear/linear_kernel.h, host): on the host branch-free, so that loops over it vectorise;
// on a device the hardware __expf.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FAST_EXP_HD __host__ __device__ __forceinline__
#else
#define FAST_EXP_HD inline
#endif

namespace mmdkernels {

FAST_EXP_HD float bits_to_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  return __builtin_bit_cast(float, bits);
#endif
}

// exp(x) for x <= 0; 0 below -87 (float underflow).
// Host: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial (max rel. error ~2e-7).
FAST_EXP_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  const bool in_range = x > -87.0f;
  x = in_range ? x : -87.0f;
  // Round x / ln2 to the nearest integer by adding and subtracting 1.5 * 2^23 (floorf does not vectorise).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  float p = 1.98412698412698413e-04f;
  p = p * r + 1.38888888888888889e-03f;
  p = p * r + 8.33333333333333333e-03f;
  p = p * r + 4.16666666666666667e-02f;
  p = p * r + 1.66666666666666667e-01f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  return in_range ? p * scale : 0.0f;
#endif
}

}  // namespace mmdkernels
