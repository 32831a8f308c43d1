// Which blocking of weight rows the few-row linear kernel runs (linear_kernel.h's R and S): "wide" (blocks of
// wide_rows(m) adjacent weight rows: the fewest loads per FMA), "spread" (the same blocks with their rows 8 / R apart:
// a block's R streams of weights land in different 4 KiB pages; the same as wide where R = 8, AVX-512 at 1-2 rows),
// "single" (one weight row at a time: one sequential stream of weights) or "segments" (rows_segments: a block's R
// rows one from each of R segments of the thread's rows, so that each of its R streams runs on through consecutive
// rows). Which streams faster depends on the CPU and the shape: on an AMD EPYC Zen 3 (AVX2) single rows were 1.2-1.3x
// faster for float32 at D = 512 and level or slower at D = 1024-4096, slower for int8 at several rows (its widening
// then waits on fewer accumulators), level or faster for int8 at one row (RESULTS.md, session 9); spread blocks
// streamed 1.1-1.35x faster than wide ones at one row for rows of 2-4 KiB, wide ones faster for 16 KiB rows of
// float32 (RESULTS.md, session 21); segments 1.1-1.45x faster than spread at one row for bfloat16 and int8 rows of
// 1-8 KiB (RESULTS.md, session 23). So in "auto" (the default) the first kBlockings * kBlockingSamples calls of each
// shape (weight dtype, rows, D, N, threads) rotate the four, timed as they run, and the fastest (fastest call each;
// single only when more than 10 % ahead of every blocked one) serves the rest of the process. All four sum every
// output in the same order, so the choice, and the calls that measure it, never change a bit.
// MMDKERNELS_LINEAR_BLOCKING=auto|wide|spread|single|segments forces one (read at every call);
// MMDKERNELS_GEMM_VERBOSE=1 prints each choice.
#pragma once

#include <cstdint>
#include <string>

namespace mmdkernels::linear {

enum class Blocking { kWide, kSpread, kSingle, kSegments };
constexpr int kBlockings = 4;

struct BlockingKey {
  int weight_bytes;  // 4 float32, 2 bfloat16, 1 int8
  int64_t rows, dim, out_features;
  int threads;
  bool operator<(const BlockingKey& o) const;
};

// The blocking of one call; measure: time it and pass the seconds to record_blocking.
struct BlockingPlan {
  Blocking blocking;
  bool measure;
  BlockingKey key;
};

BlockingPlan plan_blocking(const BlockingKey& key);
void record_blocking(const BlockingPlan& plan, double seconds);
// The decided shapes as JSON: [{"dtype", "rows", "dim", "out_features", "threads", "chosen", "gb_per_s": {...}}].
std::string blocking_choices_json();

}  // namespace mmdkernels::linear
