// 16-lane float32 vectors for the few-row linear kernel (csrc/linear/linear_cpu.cpp): unaligned loads of x and of
// weights stored as float32, bfloat16 (widened in registers: a shift left by 16) or int8 (sign-extended, converted),
// and the transpose tree that sums C accumulators across their lanes 16 at a time.
#pragma once
#pragma GCC diagnostic ignored "-Wpsabi"  // vectors wider than the AVX2 build's registers, in inline helpers only
// GCC 12 false positive on the _mm512_undefined_* operand inside the AVX-512 widening intrinsics (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <cstdint>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace mmdkernels::linear {

// One Vec is one register: 16 lanes with AVX-512, 8 with AVX2 (GCC keeps a 64-byte vector in memory when the ISA has
// no 64-byte registers, which made the AVX2 library 3-10x slower).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
// GCC/Clang vector extensions: portable (lowered to the widest vectors the -m flags allow), unaligned loads allowed.
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));
typedef uint16_t U16Vec __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t U32Vec __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef int8_t I8Vec __attribute__((vector_size(kLanes)));
typedef int32_t I32Vec __attribute__((vector_size(kLanes * sizeof(int32_t))));

static inline Vec load_floats(const float* p) { return *reinterpret_cast<const Vec*>(p); }
static inline void store_floats(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }
static inline Vec load_weights(const float* p) { return load_floats(p); }
// bfloat16 bits (uint16) -> float32: the bf16 value is the high half of the float32.
// Narrow weights are widened with the ISA's extend instructions: GCC 12 lowers __builtin_convertvector from 8- or
// 16-bit lanes to 512-bit vectors lane by lane.
#if defined(__AVX512F__)
static inline Vec load_weights(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (Vec)_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline Vec load_weights(const int8_t* p) {
  return (Vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#elif defined(__AVX2__)
static inline Vec load_weights(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (Vec)_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline Vec load_weights(const int8_t* p) {
  return (Vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#else
static inline Vec load_weights(const uint16_t* p) {
  U16Vec bits;
  __builtin_memcpy(&bits, p, sizeof(bits));
  return (Vec)(__builtin_convertvector(bits, U32Vec) << 16);
}
static inline Vec load_weights(const int8_t* p) {
  I8Vec bytes;
  __builtin_memcpy(&bytes, p, sizeof(bytes));
  return __builtin_convertvector(__builtin_convertvector(bytes, I32Vec), Vec);
}
#endif
// bfloat16 weights in pairs of vectors from one load of 2 * kLanes weights: the even-indexed weights (the low
// halves of each 32-bit lane, shifted up) and the odd-indexed ones (the high halves, masked): no widening shuffle.
// x must then be read in the same order (bf16_pair_order).
#if defined(__AVX512F__)
constexpr bool kBf16Pairs = true;
static inline void load_bf16_pair(const uint16_t* p, Vec& even, Vec& odd) {
  const __m512i v = _mm512_loadu_si512(p);
  even = (Vec)_mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = (Vec)_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#elif defined(__AVX2__)
constexpr bool kBf16Pairs = true;
static inline void load_bf16_pair(const uint16_t* p, Vec& even, Vec& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = (Vec)_mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = (Vec)_mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#else
constexpr bool kBf16Pairs = false;
static inline void load_bf16_pair(const uint16_t* p, Vec& even, Vec& odd) {
  uint32_t e[kLanes], o[kLanes];  // never called (kBf16Pairs is false): the portable build widens vector by vector
  for (int i = 0; i < kLanes; ++i) {
    e[i] = static_cast<uint32_t>(p[2 * i]) << 16;
    o[i] = static_cast<uint32_t>(p[2 * i + 1]) << 16;
  }
  __builtin_memcpy(&even, e, sizeof(even));
  __builtin_memcpy(&odd, o, sizeof(odd));
}
#endif

static inline float weight_value(float w) { return w; }
static inline float weight_value(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  __builtin_memcpy(&value, &wide, sizeof(value));
  return value;
}
static inline float weight_value(int8_t w) { return static_cast<float>(w); }

// One level of the transpose tree: a and b each hold kLanes / W sources of W partial sums; the result holds
// 2 * kLanes / W sources of W / 2 partial sums (block s of W lanes: the first halves of a's and b's source s, plus
// their second halves). After log2(kLanes) levels lane i holds the whole sum of source bit_reverse(i).
constexpr int fold_lane(int w, bool high, int i) {
  const int block = i / w, j = i % w, half = w / 2, offset = high ? half : 0;
  return j < half ? block * w + j + offset : kLanes + block * w + (j - half) + offset;
}
template <int W, int... Is>
static inline Vec fold(Vec a, Vec b, std::integer_sequence<int, Is...>) {
  return __builtin_shufflevector(a, b, fold_lane(W, false, Is)...) +
         __builtin_shufflevector(a, b, fold_lane(W, true, Is)...);
}
template <int W>
static inline void fold_level(Vec* level) {
#pragma GCC unroll 16
  for (int i = 0; i < W / 2; ++i)  // W vectors in (each kLanes / W sources), W / 2 out
    level[i] = fold<W>(level[2 * i], level[2 * i + 1], std::make_integer_sequence<int, kLanes>{});
  if constexpr (W > 2) fold_level<W / 2>(level);
}
constexpr int bit_reverse(int i) {
  int reversed = 0;
  for (int bit = 1; bit < kLanes; bit <<= 1) reversed = (reversed << 1) | ((i & bit) ? 1 : 0);
  return reversed;
}

// sums[i] = the sum of acc[i]'s lanes, for i < C, kLanes accumulators per tree (a fixed order: the same for every
// call and thread count).
template <int C>
static inline void lane_sums(const Vec* acc, float* sums) {
  constexpr int kHere = C < kLanes ? C : kLanes;
  Vec level[kLanes];
#pragma GCC unroll 16
  for (int i = 0; i < kLanes; ++i) level[i] = i < kHere ? acc[i] : Vec{};
  fold_level<kLanes>(level);
#pragma GCC unroll 16
  for (int lane = 0; lane < kLanes; ++lane)
    if (bit_reverse(lane) < kHere) sums[bit_reverse(lane)] = level[0][lane];
  if constexpr (C > kLanes) lane_sums<C - kLanes>(acc + kLanes, sums + kLanes);
}

}  // namespace mmdkernels::linear
