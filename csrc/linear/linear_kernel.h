// The few-row linear kernel's loops (no torch dependency, so that a scratch benchmark can include them): see
// csrc/linear/linear_cpu.cpp for the design. rows_block<T, M> computes output columns [n_begin, n_end) of y for the
// M rows of x with weights of type T (float, bfloat16 bits as uint16_t, int8).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/fast_exp.h"
#include "linear/linear_vec.h"

namespace mmdkernels::linear {

constexpr int64_t kMaxRows = 16;

// Rows of x per pass over a block of R weight rows: the pass's m * R accumulators, R weight vectors and one x vector
// must fit in the vector registers (32 zmm with AVX-512, 16 ymm with AVX2). More rows (classifier-free guidance
// doubles the batch) take several passes over the same R weight rows, which the later passes read from L1: the
// weights still stream from memory once. Narrow weights (bfloat16, int8) are widened once, by the first pass, which
// keeps the float32 vectors in an L1 buffer for the later passes (widening costs 2 instructions per weight vector on
// the FMA ports). A pass loads m + R vectors for m * R FMAs, so passes of 4 rows against 4 weight rows need the
// fewest loads per FMA that fit. Measured on the 2-core AVX-512 Xeon (benchmarks/RESULTS.md, session 6), float32
// streamed from L3 and from memory: passes of 8 rows against 2 weight rows were 0.85-0.97x as fast at 8 and 16 rows
// (1.03-1.08x at 5-6 rows, within the noise there). With AVX2 (16 ymm, R = 2 from 3 rows on) passes of up to 6 rows
// (12 accumulators) measured faster than passes of 4 on an AMD EPYC Zen 3, all three weight types streamed from L3
// and from memory (RESULTS.md, session 19): 1.11-1.29x at 5-6 rows (one pass instead of two), 1.04-1.08x for float32
// and bfloat16 at 12-16 rows, int8 level there. The passes never change an output's order of summation.
#if defined(__AVX512F__)
constexpr int kMaxPassRows = 4;
constexpr int block_rows(int m) { return m <= 2 ? 8 : 4; }
#else
constexpr int kMaxPassRows = 6;
constexpr int block_rows(int m) { return m <= 2 ? 4 : 2; }
#endif
// Rows of x per pass in the "single" blocking (one weight row at a time, blocking.h). float32 weights with AVX2: up to
// 8 (8 accumulators), measured on an AMD EPYC Zen 3 from L3 and from memory (RESULTS.md, session 19): at 8 rows one
// pass streamed 1.17-1.25x faster than two passes of 4 and 1.24x faster than the wide blocks; bfloat16 0.86-1.01x
// and int8 slower (their later passes read weights already widened, while the first is bound by the widening). Which
// of single and wide runs is measured per shape (blocking.h).
template <typename T>
constexpr int single_pass_rows() {
#if defined(__AVX512F__)
  return kMaxPassRows;
#else
  return std::is_same_v<T, float> ? 8 : kMaxPassRows;
#endif
}
// Rows of the first pass when m rows are split into equal passes of at most max_pass (the last may be smaller).
constexpr int pass_rows(int m, int max_pass) {
  const int passes = (m + max_pass - 1) / max_pass;
  return (m + passes - 1) / passes;
}
// A software prefetch (into L2) this many bytes ahead of every weight stream. One core has too few loads in flight
// to reach the memory's bandwidth on its own once there are several FMAs per weight vector (M > 1); prefetching
// 16 KiB ahead took the M = 4 float32 stream from 7.5 to 12 GB/s there (13 GB/s is the core's copy bandwidth).
constexpr int64_t kPrefetchBytes = 16384;

// Columns of x per chunk: all M rows of a chunk of x (M * chunk floats, at most 16 KiB) stay in L1 while every
// weight row of a group streams its chunk past them, instead of being re-read from L2 for every weight row once
// M * D floats outgrow L1 (measured at D = 4096, 16 rows: bfloat16 1.5x and float32 1.25x faster with chunks).
constexpr int64_t kChunkBytes = 16384;
constexpr int64_t chunk_columns(int m) {
  return kChunkBytes / 4 / m / 64 * 64 > 64 ? kChunkBytes / 4 / m / 64 * 64 : 64;  // a multiple of every line
}
constexpr int kGroupRows = 8;  // weight rows per group: the threads' unit of work; every R divides it

// Where a pass reads its R weight vectors: kFirst from memory (prefetching ahead); kFirstKeep the same, and stores
// the widened vectors in `kept` for the later passes; kAgain from w again (float32 weights, now in L1); kKept from
// `kept` (the widened narrow weights).
enum class Pass { kFirst, kFirstKeep, kAgain, kKept };

// One pass over `len` columns (x, w and kept start at the chunk's first column, a multiple of the line; len a
// multiple of kLanes): R weight rows (w, D apart; kept, ldk apart) against M rows of x, added to
// acc_io[m * kStrideM + r * kStrideR]. Out of line: GCC inlined it into some blockings and not others, and the loop's
// schedule changed with the code around it (int8 at one row: MusicGen-small's step 2-6 % slower once inlined into
// rows_segments; RESULTS.md, session 24). A call per row and chunk costs nothing next to its kilobytes of weights.
template <typename T, int M, int R, int U, Pass kPass, bool kPairs = false, int kStrideM = R, int kStrideR = 1>
__attribute__((noinline)) static void dot_pass(const float* x, int64_t ldx, const T* w, int64_t dim, float* kept,
                                               int64_t ldk, int64_t len, Vec* acc_io) {
  static_assert(!kPairs || (std::is_same_v<T, uint16_t> && M == 1 && U == 2 && kPass == Pass::kFirst),
                "pairs: bfloat16 weights, one row of x, two partial sums");
  constexpr int64_t kLine = 64 / sizeof(T);  // weights per cache line
  constexpr int64_t kAhead = kPrefetchBytes / sizeof(T);
  static_assert(kLine / kLanes % U == 0, "U must divide the vectors per cache line");
  Vec acc[U * M * R];  // U interleaved partial sums over the columns: set u takes vectors u, u + U, ... of a line
#pragma GCC unroll 128
  for (int i = 0; i < M * R; ++i) acc[i] = acc_io[i / R * kStrideM + i % R * kStrideR];
#pragma GCC unroll 128
  for (int i = M * R; i < U * M * R; ++i) acc[i] = Vec{};
  auto accumulate = [&](int64_t k, int u) __attribute__((always_inline)) {
    Vec wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if constexpr (kPass == Pass::kKept) {
        wv[r] = load_floats(kept + r * ldk + k);
      } else {
        wv[r] = load_weights(w + r * dim + k);
        if constexpr (kPass == Pass::kFirstKeep) store_floats(kept + r * ldk + k, wv[r]);
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      Vec xv = load_floats(x + m * ldx + k);
#if defined(__x86_64__)
      // One load of x, in a register, for the R weight rows: GCC would fold the load into each of the R FMAs, and
      // the loads, not the FMAs, then bound the loop (measured: 8 rows of float32 from 14.8 to 16.9 GB/s, hot).
      asm("" : "+v"(xv));
#endif
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[u * M * R + m * R + r] += xv * wv[r];
    }
  };
  // kPairs: 2 * kLanes weights per load, the even ones into partial sum 0 and the odd ones into 1, against x in
  // bf16_pair_order.
  auto accumulate_pair = [&](int64_t k) __attribute__((always_inline)) {
    if constexpr (kPairs) {
      Vec xe = load_floats(x + k), xo = load_floats(x + k + kLanes);
#if defined(__x86_64__)
      asm("" : "+v"(xe), "+v"(xo));
#endif
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        Vec even, odd;
        load_bf16_pair(w + r * dim + k, even, odd);
        acc[r] += xe * even;
        acc[R + r] += xo * odd;
      }
    }
  };
  const int64_t lines_end = len / kLine * kLine;
  int64_t k = 0;
  for (; k < lines_end; k += kLine) {
    if constexpr (kPass == Pass::kFirst || kPass == Pass::kFirstKeep) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) __builtin_prefetch(w + r * dim + k + kAhead, 0, 1);  // never faults past the end
    }
    if constexpr (kPairs) {
#pragma GCC unroll 8
      for (int64_t v = 0; v < kLine / (2 * kLanes); ++v) accumulate_pair(k + v * 2 * kLanes);
    } else {
#pragma GCC unroll 8
      for (int64_t v = 0; v < kLine / kLanes; ++v) accumulate(k + v * kLanes, v % U);
    }
  }
  if constexpr (kPairs)
    for (; k + 2 * kLanes <= len; k += 2 * kLanes) accumulate_pair(k);
  for (; k < len; k += kLanes) accumulate(k, 0);
#pragma GCC unroll 128
  for (int i = 0; i < M * R; ++i) {
    Vec total = acc[i];
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u) total += acc[u * M * R + i];
    acc_io[i / R * kStrideM + i % R * kStrideR] = total;
  }
}

// All M rows against R weight rows over `len` columns, in passes of pass_rows(M, P) rows: acc[m * kStrideM +
// r * kStrideR].
template <typename T, int M, int P, int R, int U, bool kFirst = true, bool kPairs = false, int kStrideM = R,
          int kStrideR = 1>
static inline void dot_rows(const float* x, int64_t ldx, const T* w, int64_t dim, float* kept, int64_t ldk,
                            int64_t len, Vec* acc) {
  constexpr int kRows = pass_rows(M, P);
  constexpr bool kNarrow = !std::is_same_v<T, float>, kMore = M > kRows;
  constexpr Pass kPass = kFirst ? (kNarrow && kMore ? Pass::kFirstKeep : Pass::kFirst)
                                : (kNarrow ? Pass::kKept : Pass::kAgain);
  dot_pass<T, kRows, R, U, kPass, kPairs, kStrideM, kStrideR>(x, ldx, w, dim, kept, ldk, len, acc);
  if constexpr (kMore)
    dot_rows<T, M - kRows, P, R, U, false, false, kStrideM, kStrideR>(x + kRows * ldx, ldx, w, dim, kept, ldk, len,
                                                                      acc + kRows * kStrideM);
}

// x [D] in the order the bfloat16 pair loads read it (dot_pass's kPairs): every whole block of 2 * kLanes columns
// before the last whole vector's end as its even columns, then its odd ones; the rest as it is.
inline void bf16_pair_order(const float* x, int64_t dim, float* out) {
  const int64_t vectors = dim - dim % kLanes, pairs_end = vectors / (2 * kLanes) * (2 * kLanes);
  for (int64_t b = 0; b < pairs_end; b += 2 * kLanes) {
    for (int i = 0; i < kLanes; ++i) {
      out[b + i] = x[b + 2 * i];
      out[b + kLanes + i] = x[b + 2 * i + 1];
    }
  }
  std::copy(x + pairs_end, x + dim, out + pairs_end);
}

// GELU(x) = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), F.gelu's erf form. erf by Abramowitz & Stegun 7.1.26
// (|error| <= 1.5e-7, the approximation ATen's vectorised CPU erf uses too), written as 1 + erf = q for x < 0 and
// 2 - q for x >= 0 with q = erfc(|x| / sqrt 2) = poly(t) exp(-x^2 / 2), so that the negative side does not cancel.
// Branch-free with our vectorising exp: a loop over outputs runs in vectors, where a scalar erf call per output had
// been 3-4 % of an int8 decode step (perf, session 13).
inline float gelu(float x) {
  const float z = std::fabs(x) * static_cast<float>(M_SQRT1_2);
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float q = poly * fast_exp(-z * z);
  return 0.5f * x * (x < 0.0f ? q : 2.0f - q);
}

// a * b + c, fused wherever the build has FMA (then always one rounding, std::fma compiles to one instruction) and
// never otherwise: the same bits wherever it is inlined. GCC's contraction of a plain a * b + c depends on the code
// around it (seen in the session-24 build: the first output of each run of 8 unfused in some blockings).
inline float multiply_add(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;  // no FMA instruction to contract into
#endif
}

// The epilogue: * scale (int8 weights) and + bias per output, as each output is finished; then the GELU (when asked)
// over whole runs of finished outputs, in vectors (activate_rows).
struct Epilogue {
  const float* scale;  // [N] or nullptr
  const float* bias;   // [N] or nullptr
  bool gelu;
  inline float operator()(float value, int64_t n) const {
    if (scale != nullptr && bias != nullptr) return multiply_add(value, scale[n], bias[n]);
    if (scale != nullptr) return value * scale[n];
    if (bias != nullptr) return value + bias[n];
    return value;
  }
  // out[j] = (*this)(sums[j], n0 + j) for the kGroupRows outputs of a run of rows, in vectors. This and
  // activate_rows are out of line: one copy for every blocking, so that no compiler choice made where they would
  // be inlined (contracting GELU's polynomial, say) can give two blockings different bits.
  __attribute__((noinline)) void finish_run(const float* sums, float* out, int64_t n0) const {
    if (scale != nullptr && bias != nullptr) {
      for (int j = 0; j < kGroupRows; ++j) out[j] = multiply_add(sums[j], scale[n0 + j], bias[n0 + j]);
    } else if (scale != nullptr) {
      for (int j = 0; j < kGroupRows; ++j) out[j] = sums[j] * scale[n0 + j];
    } else if (bias != nullptr) {
      for (int j = 0; j < kGroupRows; ++j) out[j] = sums[j] + bias[n0 + j];
    } else {
      for (int j = 0; j < kGroupRows; ++j) out[j] = sums[j];
    }
  }
  // y[m * ldy + n] = GELU(y[m * ldy + n]) for m < rows, n in [n_begin, n_end), when asked
  __attribute__((noinline)) void activate_rows(float* y, int64_t ldy, int64_t rows, int64_t n_begin,
                                               int64_t n_end) const {
    if (!gelu) return;
    for (int64_t m = 0; m < rows; ++m) {
      float* row = y + m * ldy;
#pragma omp simd
      for (int64_t n = n_begin; n < n_end; ++n) row[n] = linear::gelu(row[n]);
    }
  }
};

// Output columns [n_begin, n_end) of y for the M rows of x (n_begin a multiple of kGroupRows, so that each output's
// order of summation does not depend on how threads split the rows). ldx, ldy: row strides of x and y; weight rows
// are D apart. Per group of 8 weight rows: chunk by chunk of D, blocks of R rows, passes of at most P rows of x.
// P and R: the defaults above, or R = 1 (blocking.h chooses by measurement; the scratch benchmarks instantiate others).
// S > 1 ("spread", whole groups only): a block's R rows are S apart (R * S divides the group), so that short rows'
// streams fall in different 4 KiB pages; the hardware's stream prefetchers follow one stream per page (measured on an
// AMD EPYC Zen 3 at one row: 2 KiB rows of bfloat16 1.25-1.35x faster, RESULTS.md, session 21).
// U > 1 splits each accumulator into U interleaved partial sums over the columns: more independent FMA chains.
// U changes the order of summation, so the library picks U by weights and rows alone (library_splits), the same in
// every blocking, so that each output is summed in one order whichever blocking runs.
// The library's U, with AVX2 (measured on an AMD EPYC Zen 3, one row of x, weights streamed from memory:
// benchmarks/RESULTS.md, sessions 9 and 21): at one row, one weight row at a time otherwise leaves a single FMA chain
// behind each widening, which bounds the stream below the memory's rate. int8: U = 4 (single blocking 1.1-1.25x
// faster than U = 2, which was 1.36-1.40x faster than U = 1); bfloat16: U = 2 (single blocking 1.3-1.4x faster
// than U = 1, and 1.25-1.35x faster than the wide blocks; U = 4 measured level with U = 1); 1 elsewhere. With
// AVX-512 (not measured since): 2 for int8 and (its pairs, below) bfloat16 at one row, 1 elsewhere.
// bfloat16 weights against one row of x are read in pairs of vectors (dot_pass's kPairs, where the ISA has them):
// with AVX2 one load and two single-cycle ops per 16 weights instead of two widening loads and two shifts, measured
// on an AMD EPYC Zen 3 inside MusicGen-small's decode step at B = 1: 0.94x the step at 1 thread, 0.97-1.0x at 2
// (RESULTS.md, session 23). Their two partial sums are the even and the odd columns, so U = 2 wherever they run.
template <typename T>
constexpr bool bf16_pairs(int m) {
  return kBf16Pairs && std::is_same_v<T, uint16_t> && m == 1;
}

template <typename T, int M>
constexpr int library_splits() {
  if constexpr (bf16_pairs<T>(M)) return 2;
#if defined(__AVX512F__)
  return std::is_same_v<T, int8_t> && M == 1 ? 2 : 1;
#else
  if constexpr (M != 1) return 1;
  return std::is_same_v<T, int8_t> ? 4 : (std::is_same_v<T, uint16_t> ? 2 : 1);
#endif
}

// R of the wide blocking for M rows: block_rows, halved until the pass's U * rows * R accumulators, R weight vectors
// and one x vector fit the vector registers.
#if defined(__AVX512F__)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif
template <typename T, int M>
constexpr int wide_rows() {
  constexpr int kRows = pass_rows(M, kMaxPassRows), kSplits = library_splits<T, M>();
  int r = block_rows(kRows);
  while (r > 1 && kSplits * kRows * r + r + 1 > kVectorRegisters) r /= 2;
  return r;
}

template <typename T, int M, int P = kMaxPassRows, int R = block_rows(pass_rows(M, P)), int U = 1, int S = 1,
          bool kPairs = false>
static void rows_block(const float* x, int64_t ldx, const T* weight, int64_t dim, float* y, int64_t ldy,
                       int64_t n_begin, int64_t n_end, Epilogue epilogue) {
  static_assert(kGroupRows % (R * S) == 0, "the spread blocks must tile a group");
  constexpr int64_t kChunk = chunk_columns(M);
  constexpr bool kKeep = !std::is_same_v<T, float> && M > pass_rows(M, P);
  alignas(64) float kept[kKeep ? R * kChunk : 1];  // the first pass's widened weights: R x kChunk floats
  const int64_t vectors = dim - dim % kLanes;
  Vec acc[kGroupRows * M];  // output (m, n) of the group at g: acc[m * kGroupRows + n - g]
  for (int64_t g = n_begin; g < n_end; g += kGroupRows) {
    const int64_t g_end = std::min<int64_t>(g + kGroupRows, n_end), blocks_end = g + (g_end - g) / R * R;
#pragma GCC unroll 128
    for (int64_t i = 0; i < kGroupRows * M; ++i) acc[i] = Vec{};  // all of them: the group's tree reads all
    // Blocks of R rows s apart: rows n0 + b + r * s (r < R) for b < s, n0 = g, g + R * s, ... s = S for a whole
    // group, 1 (adjacent rows) for a partial one (the last), whose rows past the blocks go one at a time.
    auto blocks = [&](auto spread) __attribute__((always_inline)) {
      constexpr int64_t s = decltype(spread)::value;
      for (int64_t k0 = 0; k0 < vectors; k0 += kChunk) {
        const int64_t len = std::min(kChunk, vectors - k0);
        for (int64_t n0 = g; n0 < blocks_end; n0 += R * s)
          for (int64_t b = 0; b < s; ++b)
            dot_rows<T, M, P, R, U, true, kPairs, kGroupRows, s>(x + k0, ldx, weight + (n0 + b) * dim + k0, s * dim,
                                                                 kept, kChunk, len, acc + n0 - g + b);
        for (int64_t n = blocks_end; n < g_end; ++n)
          dot_rows<T, M, P, 1, U, true, kPairs, kGroupRows>(x + k0, ldx, weight + n * dim + k0, dim, kept, kChunk,
                                                            len, acc + n - g);
      }
    };
    if (S > 1 && g_end - g == kGroupRows)
      blocks(std::integral_constant<int64_t, S>{});
    else
      blocks(std::integral_constant<int64_t, 1>{});
    // The group's outputs: one transpose tree for all its accumulators (lane_sums sums each accumulator's lanes in
    // the same order whatever shares its tree; a tree per block of R rows left most of its lanes empty at one row of
    // x: 3.4 % of an int8 MusicGen-small step at B = 1 in perf, session 21), then the columns past the last whole
    // vector and the epilogue, in vectors for a whole group.
    float sums[kGroupRows * M];
    lane_sums<kGroupRows * M>(acc, sums);
    for (int m = 0; m < M; ++m) {
      float* run = sums + m * kGroupRows;
      if (vectors < dim) {
        for (int64_t n = g; n < g_end; ++n)
          for (int64_t k = vectors; k < dim; ++k)
            run[n - g] = multiply_add(x[m * ldx + k], weight_value(weight[n * dim + k]), run[n - g]);
      }
      if (g_end - g == kGroupRows) {
        epilogue.finish_run(run, y + m * ldy + g, g);
      } else {
        for (int64_t n = g; n < g_end; ++n) y[m * ldy + n] = epilogue(run[n - g], n);
      }
    }
  }
  epilogue.activate_rows(y, ldy, M, n_begin, n_end);
}

// The "segments" blocking: the rows [n_begin, n_end) cut into R segments of L rows (L a multiple of kGroupRows), and
// blocks of R rows, one from each segment, L rows apart: the block's R streams of weights each run on through
// consecutive rows, so that every stream stays sequential for the whole segment however short a row is (the spread
// blocks' streams restart every row; measured on an AMD EPYC Zen 3 at one row of x and 2 KiB rows of bfloat16:
// 1.26x faster than spread, RESULTS.md, session 23). The rows past R * L go through rows_block's adjacent blocks.
// Every output is summed as in rows_block (the same passes, chunks and U), so the blocking never changes a bit.
template <typename T, int M, int P = kMaxPassRows, int R = block_rows(pass_rows(M, P)), int U = 1,
          bool kPairs = false>
static void rows_segments(const float* x, int64_t ldx, const T* weight, int64_t dim, float* y, int64_t ldy,
                          int64_t n_begin, int64_t n_end, Epilogue epilogue) {
  constexpr int64_t kChunk = chunk_columns(M);
  constexpr bool kKeep = !std::is_same_v<T, float> && M > pass_rows(M, P);
  alignas(64) float kept[kKeep ? R * kChunk : 1];
  const int64_t vectors = dim - dim % kLanes;
  const int64_t segment = R > 1 ? (n_end - n_begin) / R / kGroupRows * kGroupRows : 0;  // L
  // Row j of the groups, segment r: acc[(m * R + r) * kGroupRows + j], so that each tree of lane_sums and each run
  // of the epilogue holds outputs of consecutive rows
  Vec acc[kGroupRows * R * M];
  for (int64_t g = n_begin; g < n_begin + segment; g += kGroupRows) {  // the first segment's group; the others L on
#pragma GCC unroll 128
    for (int64_t i = 0; i < kGroupRows * R * M; ++i) acc[i] = Vec{};
    for (int64_t k0 = 0; k0 < vectors; k0 += kChunk) {
      const int64_t len = std::min(kChunk, vectors - k0);
      for (int64_t j = 0; j < kGroupRows; ++j)
        dot_rows<T, M, P, R, U, true, kPairs, R * kGroupRows, kGroupRows>(
            x + k0, ldx, weight + (g + j) * dim + k0, segment * dim, kept, kChunk, len, acc + j);
    }
    float sums[kGroupRows * R * M];
    lane_sums<kGroupRows * R * M>(acc, sums);
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < R; ++r) {
        const int64_t n0 = g + r * segment;
        float* run = sums + (m * R + r) * kGroupRows;
        if (vectors < dim) {
          for (int64_t j = 0; j < kGroupRows; ++j) {
            const T* w = weight + (n0 + j) * dim;
            for (int64_t k = vectors; k < dim; ++k) run[j] = multiply_add(x[m * ldx + k], weight_value(w[k]), run[j]);
          }
        }
        epilogue.finish_run(run, y + m * ldy + n0, n0);
      }
    }
  }
  epilogue.activate_rows(y, ldy, M, n_begin, n_begin + R * segment);
  if (n_begin + R * segment < n_end)
    rows_block<T, M, P, R, U, 1, kPairs>(x, ldx, weight, dim, y, ldy, n_begin + R * segment, n_end, epilogue);
}

}  // namespace mmdkernels::linear
