// Small helpers of the kernels that choose by measurement at run time (the RVQ tile kernel, dHSIC's distance
// tiles): shape classes bucketed to powers of two, and wall-clock timing of a call.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>

namespace mmdkernels {

// The smallest power of two >= v (v >= 1): the bucket of a shape class.
inline int64_t pow2_bucket(int64_t v) {
  int64_t b = 1;
  while (b < v) b <<= 1;
  return b;
}

// Seconds of the fastest of `rounds` calls of fn.
template <typename Fn>
double best_seconds(int rounds, Fn&& fn) {
  double best = std::numeric_limits<double>::infinity();
  for (int r = 0; r < rounds; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace mmdkernels
