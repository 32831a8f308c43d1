// The few-row linear with bfloat16 or float32 weights on AMX tiles (x86 CPUs with AMX-BF16: Intel Sapphire Rapids and
// later), for the row counts where the FMA kernel (linear_kernel.h) is bound by its FMAs rather than by memory (int8
// weights: AMX-INT8 tiles, linear_amx_int8.h).
// x is split once per call into three bfloat16 parts, x = hi + mid + lo to float32 precision (each part rounds what
// the earlier ones left: 3 x 8 significant bits), laid out as AMX B tiles (pairs of columns, one per row of x).
// An A tile holds 16 weight rows x 32 columns of bfloat16 weights, loaded in place (stride D). Three TDPBF16PS per step accumulate the hi, mid and lo products in three C tiles
// of 16 weight rows x M float32 (a product of two bfloat16 is exact in float32; each C element is a float32 FMA
// chain), summed at the end as hi + (mid + lo); columns past the last 32 are added in float32. Activations are not
// quantised: the three parts carry x's float32 value. float32 weights (from more rows on, linear_cpu.cpp) are split
// exactly into three bfloat16 A tiles as well, with six tile products per step (split_weights, rows_block).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "linear/linear_kernel.h"

#if defined(__AVX512F__) && defined(__linux__) && defined(__x86_64__)
#define MMDKERNELS_LINEAR_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace mmdkernels::linear::amx {

constexpr int kTileRows = 16;     // weight rows per tile
constexpr int kTileColumns = 32;  // columns of x per step: 32 bfloat16, one 64-byte tile row
constexpr int kParts = 3;         // hi, mid, lo

// Whether this CPU and OS run AMX-BF16 (asks the OS for the tile state once, for the process);
// MMDKERNELS_LINEAR_AMX=0 turns the path off (the tests run both paths).
inline bool available() {
  static const bool supported = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;  // AVX512-BF16
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  const char* env = std::getenv("MMDKERNELS_LINEAR_AMX");
  return supported && !(env != nullptr && std::strcmp(env, "0") == 0);
}

// bfloat16 elements of the packed x: per step of 32 columns, kParts B tiles of 16 pairs x M rows.
inline int64_t packed_size(int rows, int64_t dim) { return dim / kTileColumns * kParts * kTileColumns * rows; }

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512bf16")

// v[i] lane j -> v[j] lane i, for 16 vectors of 16 int32 (a 16 x 16 transpose in registers: pairs, quads, then
// 128-bit lanes twice).
static inline void transpose_16x16(__m512i* v) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_i32x4(v[h + i], v[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_i32x4(v[h + i], v[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    v[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    v[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// packed[((step * kParts + part) * 16 + j) * 2 * rows + 2 * m + i] = part of x[m, 32 * step + 2 * j + i]: each part
// rounds (to nearest even) what the earlier parts left of x, exactly (the rounding error of a float32 is a float32).
// A step's rows of one part (pair j in lane j) are transposed in registers and stored pair by pair, rows apart:
// scattering them pair by pair instead cost 6-30 ns per row and part, up to 180 us a call at 16 rows and D = 4096
// (RESULTS.md, session 11).
inline void pack_x(const float* x, int64_t ldx, int rows, int64_t dim, uint16_t* packed) {
  auto widen = [](__m256i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); };
  const __mmask16 row_mask = static_cast<__mmask16>((1u << rows) - 1);
  alignas(64) int32_t parts[kParts][kTileRows][16];  // [part][row m of x][pair j]
  for (int m = rows; m < kTileRows; ++m)
    for (int part = 0; part < kParts; ++part) _mm512_store_si512(parts[part][m], _mm512_setzero_si512());
  for (int64_t step = 0; step < dim / kTileColumns; ++step) {
    for (int m = 0; m < rows; ++m) {
      const float* row = x + m * ldx + step * kTileColumns;
      __m512 low = _mm512_loadu_ps(row), high = _mm512_loadu_ps(row + 16);
      for (int part = 0; part < kParts; ++part) {
        const __m512i bits = (__m512i)_mm512_cvtne2ps_pbh(high, low);  // pair j: columns 2j, 2j + 1
        _mm512_store_si512(parts[part][m], bits);
        low = _mm512_sub_ps(low, widen(_mm512_castsi512_si256(bits)));
        high = _mm512_sub_ps(high, widen(_mm512_extracti64x4_epi64(bits, 1)));
      }
    }
    for (int part = 0; part < kParts; ++part) {
      __m512i v[16];
      for (int m = 0; m < kTileRows; ++m) v[m] = _mm512_load_si512(parts[part][m]);
      transpose_16x16(v);
      auto* out = reinterpret_cast<int32_t*>(packed + (step * kParts + part) * kTileColumns * rows);
      for (int j = 0; j < 16; ++j) _mm512_mask_storeu_epi32(out + j * rows, row_mask, v[j]);
    }
  }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// The 16 outputs of a tile for each row m of x, from the C tiles (sums[part][r * rows + m]): hi + (mid + lo), the
// columns [vectors, D) in float32, then the epilogue 16 outputs at a time (y: the tile's first output).
template <typename T>
static inline void finish_tile(float (*sums)[kTileRows * kMaxRows], const float* x, int64_t ldx, int rows, const T* w,
                               int64_t dim, int64_t vectors, float* y, int64_t ldy, int64_t n0,
                               const Epilogue& epilogue) {
  float* total = sums[0];
  for (int i = 0; i < kTileRows * rows; i += 16)
    _mm512_store_ps(total + i, _mm512_add_ps(_mm512_load_ps(total + i),
                                             _mm512_add_ps(_mm512_load_ps(sums[1] + i), _mm512_load_ps(sums[2] + i))));
  for (int64_t k = vectors; k < dim; ++k)
    for (int r = 0; r < kTileRows; ++r)
      for (int m = 0; m < rows; ++m) total[r * rows + m] += x[m * ldx + k] * weight_value(w[r * dim + k]);
  const __m512i row_offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(rows));
  for (int m = 0; m < rows; ++m) {
    __m512 out = _mm512_i32gather_ps(row_offsets, total + m, 4);
    if (epilogue.scale != nullptr) out = _mm512_mul_ps(out, _mm512_loadu_ps(epilogue.scale + n0));
    if (epilogue.bias != nullptr) out = _mm512_add_ps(out, _mm512_loadu_ps(epilogue.bias + n0));
    _mm512_storeu_ps(y + m * ldy, out);
  }
  epilogue.activate_rows(y, ldy, rows, 0, kTileRows);
}

// float32 weights, split exactly into three bfloat16 parts by truncation (w = hi + mid + lo: each part the top 8
// significant bits of what the earlier parts left, so nothing is rounded), as A tiles of one step (16 weight rows x
// 32 columns each, 1 KiB): out[part][r * 32 + j] = part of w[r * dim + j]. 11 vector instructions per 32 weights.
static inline void split_weights(const float* w, int64_t dim, uint16_t (*out)[kTileRows * kTileColumns]) {
  const __m512i high_halves = _mm512_setr_epi32(  // bfloat16 j of the result: the high half of float32 j
      0x00030001, 0x00070005, 0x000b0009, 0x000f000d, 0x00130011, 0x00170015, 0x001b0019, 0x001f001d, 0x00230021,
      0x00270025, 0x002b0029, 0x002f002d, 0x00330031, 0x00370035, 0x003b0039, 0x003f003d);
  const __m512i mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int r = 0; r < kTileRows; ++r) {
    __m512i low = _mm512_loadu_si512(w + r * dim), high = _mm512_loadu_si512(w + r * dim + 16);
    for (int part = 0; part < kParts; ++part) {
      _mm512_store_si512(out[part] + r * kTileColumns, _mm512_permutex2var_epi16(low, high_halves, high));
      if (part + 1 == kParts) break;
      low = _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(low),
                                              _mm512_castsi512_ps(_mm512_and_si512(low, mask))));
      high = _mm512_castps_si512(_mm512_sub_ps(_mm512_castsi512_ps(high),
                                               _mm512_castsi512_ps(_mm512_and_si512(high, mask))));
    }
  }
}

// Weight rows [n_begin, n_end) (multiples of 16) of y for the rows of x. bfloat16 weights: tiles 0-2 C (x's hi, mid,
// lo parts), 3 A (the weights), 4-6 B (x's parts). float32 weights: tiles 3, 2, 7 A (the weights' hi, mid, lo parts),
// 0 C of hi x hi and 1 C of the five next products (down to ~2^-16 of |x||w|; the three left out, w mid x x lo,
// w lo x x mid and w lo x x lo, are below 2^-22 of it: |mid| < 2^-7 |w|, |lo| < 2^-15 |w| after truncation, x's
// rounded parts 2^-8 and 2^-16 of |x|). x and ldx serve the columns past the last 32.
template <typename T>
void rows_block(const uint16_t* packed, const float* x, int64_t ldx, int rows, const T* weight, int64_t dim,
                float* y, int64_t ldy, int64_t n_begin, int64_t n_end, const Epilogue& epilogue) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, uint16_t>, "float32 or bfloat16 weights");
  constexpr bool kFloat = std::is_same_v<T, float>;
  TileConfig config;
  for (int t = 0; t < (kFloat ? 8 : 7); ++t) {
    config.rows[t] = kTileRows;
    config.bytes_per_row[t] = t == 3 || t == 7 || (kFloat && t == 2) ? 64 : rows * 4;
  }
  // GCC's tile instructions are asm statements that name no memory (ldtilecfg names 8 bytes of its 64): these
  // barriers keep the stores of the configuration, the packed x and the widened weights before the loads of them.
  asm volatile("" : : "r"(&config), "r"(packed) : "memory");
  _tile_loadconfig(&config);
  const int64_t steps = dim / kTileColumns, b_stride = kTileColumns * rows;  // bfloat16 per B tile
  // float32 weights (split through a buffer): each step prefetches its share of the next tile's weights (16 rows x D,
  // contiguous) into L2, in address order, a whole tile ahead (a fixed distance ahead of each row reaches only half a
  // tile at D = 512: int8, when it ran here, 1.1-1.4x faster this way, RESULTS.md session 7). bfloat16 tiles, loaded
  // straight from the weights, kept the fixed distance per row, which measured better for them at 16 rows.
  constexpr int64_t kStepBytes = kTileRows * kTileColumns * sizeof(T);
  auto prefetch_next = [&](const T* next, int64_t step) __attribute__((always_inline)) {
    const char* bytes = reinterpret_cast<const char*>(next) + step * kStepBytes;
#pragma GCC unroll 32
    for (int64_t line = 0; line < kStepBytes; line += 64) __builtin_prefetch(bytes + line, 0, 1);
  };
  // float32 weights split into A tiles one step ahead (two buffers), so that the stores drain while the tiles work.
  alignas(64) uint16_t widened[2][kFloat ? kParts : 1][kTileRows * kTileColumns];
  auto widen = [&](const T* w, int64_t step) __attribute__((always_inline)) {
    if constexpr (kFloat) split_weights(w + step * kTileColumns, dim, widened[step % 2]);
  };
  alignas(64) float sums[kParts][kTileRows * kMaxRows];  // C tiles: [weight row r][row m of x], rows apart
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileRows) {
    const T* w = weight + n0 * dim;
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (!kFloat) _tile_zero(2);
    const T* next = n0 + kTileRows < n_end ? w + kTileRows * dim : nullptr;
    if constexpr (kFloat) widen(w, 0);
    for (int64_t step = 0; step < steps; ++step) {
      const int64_t k = step * kTileColumns;
      if constexpr (!kFloat) {
        for (int r = 0; r < kTileRows; ++r) __builtin_prefetch(w + r * dim + k + kPrefetchBytes / 2, 0, 1);
        _tile_loadd(3, w + k, dim * 2);
      } else {
        if (next != nullptr) prefetch_next(next, step);
        asm volatile("" : : "r"(widened[step % 2]) : "memory");
        _tile_loadd(3, widened[step % 2][0], 64);
        _tile_loadd(2, widened[step % 2][1], 64);
        _tile_loadd(7, widened[step % 2][2], 64);
        asm volatile("" : : : "memory");
        if (step + 1 < steps) widen(w, step + 1);
      }
      const uint16_t* b = packed + step * kParts * b_stride;
      _tile_loadd(4, b, rows * 4);
      _tile_loadd(5, b + b_stride, rows * 4);
      _tile_loadd(6, b + 2 * b_stride, rows * 4);
      if constexpr (kFloat) {
        _tile_dpbf16ps(0, 3, 4);  // hi x hi
        _tile_dpbf16ps(1, 3, 5);  // w hi x x mid, w hi x x lo, w mid x x hi, w mid x x mid, w lo x x hi
        _tile_dpbf16ps(1, 3, 6);
        _tile_dpbf16ps(1, 2, 4);
        _tile_dpbf16ps(1, 2, 5);
        _tile_dpbf16ps(1, 7, 4);
      } else {
        _tile_dpbf16ps(0, 3, 4);
        _tile_dpbf16ps(1, 3, 5);
        _tile_dpbf16ps(2, 3, 6);
      }
    }
    _tile_stored(0, sums[0], rows * 4);
    _tile_stored(1, sums[1], rows * 4);
    if constexpr (kFloat) {
      std::memset(sums[2], 0, sizeof(sums[2]));
    } else {
      _tile_stored(2, sums[2], rows * 4);
    }
    finish_tile(sums, x, ldx, rows, w, dim, steps * kTileColumns, y + n0, ldy, n0, epilogue);
  }
  _tile_release();
}

#pragma GCC pop_options

}  // namespace mmdkernels::linear::amx
#endif
