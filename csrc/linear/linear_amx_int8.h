// The few-row linear with int8 weights on AMX-INT8 tiles (TDPBSSD: int8 x int8 -> int32), the weights read in place.
// x is written once per call as four signed 8-bit digits per element on a fixed-point grid of its row:
//     v = round(x * 2^s) (|v| <= 2^30, s from the row's largest |x|),  v = d0 + 256 d1 + 65536 d2 + 2^24 d3,
// d_p in [-128, 127] (balanced base 256: the bytes of v + 0x80808080, each minus 128). A B tile holds four rows of x
// as 16 columns (row, digit), 64 columns of D deep, so one TDPBSSD multiplies 16 weight rows x 64 columns of the
// weights as stored by all digits of four rows of x, exactly in int32. (No widening: int8 weights through the
// bfloat16 tiles of linear_amx.h cost ~3 vector instructions per 16 weights to widen, which bound them near the FMA
// kernel's rate; those tiles no longer take int8.) At the end
//     y = scale * 2^-s * (C0 + 256 C1 + 65536 C2 + 2^24 C3)   (in double, then rounded to float32),
// plus the columns past the last 64 in float32. So the only rounding before the last two is x's to the grid: at most
// 2^-30 max |x_row| per element, i.e. |y - exact| <= 2^-30 max|x_row| sum|w_row| scale + two float32 roundings,
// below what float32 accumulation of the same dot product rounds on rows of ordinary range
// (tests/test_linear_int8_tiles.py: bit for bit against this formula, the bound on rows of 2^-30..2^30, the tolerance
// rule against float64).
// int32 cannot overflow: |d w| <= 2^14 per product, so D <= kMaxDigitDim. Rows holding inf or NaN are not written
// (pack_digits returns false) and the caller takes another path, which propagates them as float32 arithmetic does.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>

#include "linear/linear_amx.h"

#if defined(MMDKERNELS_LINEAR_AMX)
namespace mmdkernels::linear::amx {

constexpr int kDigitColumns = 64;             // int8 columns of D per step: one 64-byte tile row
constexpr int kDigitRowsPerGroup = 4;         // rows of x per B / C tile: 4 rows x 4 digits = 16 columns
constexpr int64_t kMaxDigitDim = 131071;      // D * 2^14 < 2^31
constexpr int64_t kDigitGroupBytes = 16 * 64;  // one B tile: 16 quads of D x 16 columns x 4 bytes

// Whether this CPU and OS run AMX-INT8 (and the bfloat16 tiles' conditions, available()).
inline bool int8_available() {
  static const bool supported = [] {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 25));
  }();
  return supported && available();
}

inline int digit_groups(int rows) { return (rows + kDigitRowsPerGroup - 1) / kDigitRowsPerGroup; }
// Bytes of the packed digits: per step of 64 columns, one B tile per group of 4 rows.
inline int64_t digits_packed_bytes(int rows, int64_t dim) {
  return dim / kDigitColumns * digit_groups(rows) * kDigitGroupBytes;
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,amx-bf16,avx512bf16,avx512bw,avx512dq")

// packed[((step * groups + g) * 16 + q) * 64 + 16 * i + 4 * p + j] = digit p of x[4 g + i, 64 step + 4 q + j] (the
// B tile layout: quad q of D in tile row q, column 4 i + p); inverse_scale[m] = 2^-s of row m. Rows past the last
// (up to a whole group) are zero. Returns false, writing nothing useful, when a row of the first 64 * steps columns
// holds inf or NaN.
inline bool pack_digits(const float* x, int64_t ldx, int rows, int64_t dim, int8_t* packed, double* inverse_scale) {
  const int groups = digit_groups(rows);
  const int64_t steps = dim / kDigitColumns, columns = steps * kDigitColumns;
  if (rows % kDigitRowsPerGroup != 0) std::memset(packed, 0, static_cast<size_t>(steps * groups * kDigitGroupBytes));
  // per 128-bit lane (4 elements, one quad of D): byte 4 p + j of the result = byte p of element j
  const __m512i quad_transpose = _mm512_set4_epi32(0x0f0b0703, 0x0e0a0602, 0x0d090501, 0x0c080400);
  const __m512i bias = _mm512_set1_epi32(static_cast<int>(0x80808080u));
  for (int m = 0; m < rows; ++m) {
    const float* row = x + m * ldx;
    __m512 largest = _mm512_setzero_ps();
    __mmask16 special = 0;
    for (int64_t k = 0; k < columns; k += 16) {
      const __m512 v = _mm512_loadu_ps(row + k);
      special |= _mm512_fpclass_ps_mask(v, 0x01 | 0x08 | 0x10 | 0x80);  // NaN, +inf, -inf
      largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
    }
    if (special != 0) return false;
    int exponent = 0;  // largest = f 2^exponent, f in [0.5, 1): |x| 2^(30 - exponent) < 2^30
    std::frexp(_mm512_reduce_max_ps(largest), &exponent);
    const int shift = 30 - exponent;
    inverse_scale[m] = std::ldexp(1.0, -shift);
    const __m512d up = _mm512_set1_pd(std::ldexp(1.0, shift));  // in double: 2^shift may leave float32's range
    int8_t* out = packed + (m / kDigitRowsPerGroup) * kDigitGroupBytes + 16 * (m % kDigitRowsPerGroup);
    for (int64_t k = 0; k < columns; k += 16) {
      const __m512 v = _mm512_loadu_ps(row + k);
      const __m256i low = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), up));
      const __m256i high = _mm512_cvtpd_epi32(
          _mm512_mul_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)), up));
      const __m512i whole = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);  // rounded to nearest even
      const __m512i digits =
          _mm512_shuffle_epi8(_mm512_xor_si512(_mm512_add_epi32(whole, bias), bias), quad_transpose);
      int8_t* quad = out + ((k / kDigitColumns) * groups * 16 + (k % kDigitColumns) / 4) * 64;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(quad), _mm512_castsi512_si128(digits));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(quad + 64), _mm512_extracti32x4_epi32(digits, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(quad + 128), _mm512_extracti32x4_epi32(digits, 2));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(quad + 192), _mm512_extracti32x4_epi32(digits, 3));
    }
  }
  return true;
}

// The 16 outputs of a tile for each row of x from the groups' C tiles (sums[g]: [weight row r][4 i + p] int32),
// the columns [columns, D) in float32, then scale, bias and activation (y: the tile's first output).
inline void finish_digit_tile(int32_t (*sums)[16 * 16], const double* inverse_scale, const float* x, int64_t ldx,
                              int rows, const int8_t* w, int64_t dim, int64_t columns, float* y, int64_t ldy,
                              int64_t n0, const Epilogue& epilogue) {
  alignas(64) float tail[16];
  const __m512i weight_rows =  // lane r: the C tile's row r, 16 int32 apart
      _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
  for (int g = 0; g < digit_groups(rows); ++g) {
    for (int i = 0; i < kDigitRowsPerGroup && kDigitRowsPerGroup * g + i < rows; ++i) {
      __m512i c[4];  // c[p]: digit p of row 4 g + i, lane r: weight row r
      for (int p = 0; p < 4; ++p) c[p] = _mm512_i32gather_epi32(weight_rows, sums[g] + 4 * i + p, 4);
      const int m = kDigitRowsPerGroup * g + i;
      const __m512d unit = _mm512_set1_pd(inverse_scale[m]);
      __m256 halves[2];
      for (int h = 0; h < 2; ++h) {
        auto digit = [&](int p) {
          return _mm512_cvtepi32_pd(h == 0 ? _mm512_castsi512_si256(c[p])
                                           : _mm512_extracti64x4_epi64(c[p], 1));
        };
        __m512d total = _mm512_fmadd_pd(digit(3), _mm512_set1_pd(256.0), digit(2));
        total = _mm512_fmadd_pd(total, _mm512_set1_pd(256.0), digit(1));
        total = _mm512_fmadd_pd(total, _mm512_set1_pd(256.0), digit(0));
        halves[h] = _mm512_cvtpd_ps(_mm512_mul_pd(total, unit));
      }
      __m512 out = _mm512_insertf32x8(_mm512_castps256_ps512(halves[0]), halves[1], 1);
      if (columns < dim) {
        for (int r = 0; r < 16; ++r) {
          float sum = 0.0f;
          for (int64_t k = columns; k < dim; ++k) sum += x[m * ldx + k] * static_cast<float>(w[r * dim + k]);
          tail[r] = sum;
        }
        out = _mm512_add_ps(out, _mm512_load_ps(tail));
      }
      if (epilogue.scale != nullptr) out = _mm512_mul_ps(out, _mm512_loadu_ps(epilogue.scale + n0));
      if (epilogue.bias != nullptr) out = _mm512_add_ps(out, _mm512_loadu_ps(epilogue.bias + n0));
      _mm512_storeu_ps(y + m * ldy, out);
    }
  }
  epilogue.activate_rows(y, ldy, rows, 0, kTileRows);
}

// One tile of 16 weight rows (w, outputs n0..n0 + 15) times the rows of x in groups [first, first + Groups) of the
// packed digits (packed_groups per step); next: the next tile's weights, prefetched into L2 1 KiB a step (a whole
// tile ahead, in address order), or null. Tiles: 0 A (the weights, in place), 1-3 C and 5-7 B (one per group).
template <int Groups>
inline void digit_tile(const int8_t* packed, int packed_groups, int first, const double* inverse_scale,
                       const float* x, int64_t ldx, int rows, const int8_t* w, const char* next, int64_t dim, float* y,
                       int64_t ldy, int64_t n0, const Epilogue& epilogue) {
  static_assert(Groups >= 1 && Groups <= 3, "at most 12 rows of x a pass");
  const int64_t steps = dim / kDigitColumns;
  _tile_zero(1);
  if constexpr (Groups > 1) _tile_zero(2);
  if constexpr (Groups > 2) _tile_zero(3);
  const int8_t* b = packed + first * kDigitGroupBytes;
  for (int64_t step = 0; step < steps; ++step, b += packed_groups * kDigitGroupBytes) {
    if (next != nullptr) {
#pragma GCC unroll 16
      for (int line = 0; line < 1024; line += 64) __builtin_prefetch(next + step * 1024 + line, 0, 1);
    }
    _tile_loadd(0, w + step * kDigitColumns, dim);
    _tile_loadd(5, b, 64);
    if constexpr (Groups > 1) _tile_loadd(6, b + kDigitGroupBytes, 64);
    if constexpr (Groups > 2) _tile_loadd(7, b + 2 * kDigitGroupBytes, 64);
    _tile_dpbssd(1, 0, 5);
    if constexpr (Groups > 1) _tile_dpbssd(2, 0, 6);
    if constexpr (Groups > 2) _tile_dpbssd(3, 0, 7);
  }
  alignas(64) int32_t sums[Groups][16 * 16];
  _tile_stored(1, sums[0], 64);
  if constexpr (Groups > 1) _tile_stored(2, sums[1], 64);
  if constexpr (Groups > 2) _tile_stored(3, sums[2], 64);
  asm volatile("" : : "r"(sums) : "memory");
  const int row0 = first * kDigitRowsPerGroup;
  finish_digit_tile(sums, inverse_scale + row0, x + row0 * ldx, ldx, std::min(rows - row0, Groups * kDigitRowsPerGroup),
                    w, dim, steps * kDigitColumns, y + row0 * ldy, ldy, n0, epilogue);
}

// Weight rows [n_begin, n_end) (multiples of 16) of y from the packed digits of x (pack_digits): up to 12 rows in one
// pass over each tile of weights, 13-16 in two passes of 8 (the second reads the tile from L1 / L2: three B tiles
// are all a C tile per group leaves, and a fourth group sharing a B tile with the first ran at a third of the rate).
template <int Groups>
void digit_rows_block(const int8_t* packed, const double* inverse_scale, const float* x, int64_t ldx, int rows,
                      const int8_t* weight, int64_t dim, float* y, int64_t ldy, int64_t n_begin, int64_t n_end,
                      const Epilogue& epilogue) {
  static_assert(Groups >= 1 && Groups <= 4, "1 to 16 rows of x");
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTileRows;
    config.bytes_per_row[t] = 64;
  }
  asm volatile("" : : "r"(&config), "r"(packed) : "memory");  // see linear_amx.h's rows_block
  _tile_loadconfig(&config);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileRows) {
    const int8_t* w = weight + n0 * dim;
    const char* next = n0 + kTileRows < n_end ? reinterpret_cast<const char*>(w + kTileRows * dim) : nullptr;
    if constexpr (Groups <= 3) {
      digit_tile<Groups>(packed, Groups, 0, inverse_scale, x, ldx, rows, w, next, dim, y + n0, ldy, n0, epilogue);
    } else {
      digit_tile<2>(packed, 4, 0, inverse_scale, x, ldx, rows, w, next, dim, y + n0, ldy, n0, epilogue);
      digit_tile<2>(packed, 4, 2, inverse_scale, x, ldx, rows, w, nullptr, dim, y + n0, ldy, n0, epilogue);
    }
  }
  _tile_release();
}

using DigitRowsBlockFn = void (*)(const int8_t*, const double*, const float*, int64_t, int, const int8_t*, int64_t,
                                  float*, int64_t, int64_t, int64_t, const Epilogue&);
inline DigitRowsBlockFn digit_rows_kernel(int rows) {
  static constexpr DigitRowsBlockFn table[4] = {&digit_rows_block<1>, &digit_rows_block<2>, &digit_rows_block<3>,
                                                &digit_rows_block<4>};
  return table[digit_groups(rows) - 1];
}

#pragma GCC pop_options

}  // namespace mmdkernels::linear::amx
#endif
