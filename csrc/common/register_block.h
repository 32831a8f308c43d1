// The vector type and the register-blocked inner loop shared by the CPU micro-kernels of our own on packed operands
// (the packed GEMM, gemm/packed_gemm.h; dHSIC's distance tiles, mmd/gram_fused.h; the RVQ encoder's fused argmin,
// rvq/rvq_fused.h, has the same block but reads its rows unpacked): compiled once per ISA library, AVX-512
// (16 lanes) or AVX2 + FMA (8 lanes).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace mmdkernels {
namespace simd {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kBlockRows = 12;  // 12 rows x 2 vectors = 24 accumulators of 32 zmm
using Vec = __m512;
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec broadcast(float v) { return _mm512_set1_ps(v); }
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
#else
constexpr int kLanes = 8;
constexpr int kBlockRows = 6;  // 6 rows x 2 vectors = 12 accumulators of 16 ymm
using Vec = __m256;
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec broadcast(float v) { return _mm256_set1_ps(v); }
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
#endif

constexpr int kBlockVecs = 2;                     // vectors of columns in a register block
constexpr int kBlockCols = kBlockVecs * kLanes;  // columns of a packed panel

// acc[r][q] = sum over d < depth of a[d * Rows + r] * b[d * kBlockCols + q * kLanes ..] (a: Rows values per depth,
// b: one packed panel of kBlockCols per depth), in depth order. The accumulators stay in registers: every loop over
// acc is unrolled (an indexed acc would live in memory).
template <int Rows>
__attribute__((always_inline)) inline void accumulate_block(int64_t depth, const float* a, const float* b, Vec (&acc)[Rows][kBlockVecs]) {
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) {
#pragma GCC unroll 4
    for (int q = 0; q < kBlockVecs; ++q) acc[r][q] = zero();
  }
  for (int64_t d = 0; d < depth; ++d) {
    Vec w[kBlockVecs];
#pragma GCC unroll 4
    for (int q = 0; q < kBlockVecs; ++q) w[q] = load(b + d * kBlockCols + q * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const Vec x = broadcast(a[d * Rows + r]);
#pragma GCC unroll 4
      for (int q = 0; q < kBlockVecs; ++q) acc[r][q] = fmadd(x, w[q], acc[r][q]);
    }
  }
}

}  // namespace simd
}  // namespace mmdkernels
