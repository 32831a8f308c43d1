// Small helpers of the kernels that choose by measurement at run time (the RVQ tile kernel, dHSIC's distance
// tiles): shape classes bucketed to powers of two, wall-clock timing of a call, and timing as a parallel region
// runs it.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <vector>

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

// fn(worker) for every worker in [0, workers), all at once: inside one parallel region of `workers` threads when
// workers > 1, inline when 1. A kernel measured this way runs as it will in the pass it is chosen for: every core
// busy, the memory bandwidth shared, and MKL single-threaded (as inside any region). Measure in a real region: a
// one-iteration at::parallel_for is none (it runs inline, outside any region, and MKL then takes every thread; the
// RVQ encoder once chose its tile kernel on such a measurement, 2x off: benchmarks/RESULTS.md, session 12).
template <typename Fn>
void on_every_worker(int64_t workers, Fn&& fn) {
  if (workers <= 1) {
    fn(int64_t{0});
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) fn(worker);
  });
}

// Seconds of the slowest worker's fn(worker), every worker at once (on_every_worker): what a pass of such calls
// waits for.
template <typename Fn>
double slowest_worker_seconds(int64_t workers, Fn&& fn) {
  std::vector<double> seconds(std::max<int64_t>(workers, 1), 0.0);
  on_every_worker(workers, [&](int64_t worker) { seconds[worker] = best_seconds(1, [&] { fn(worker); }); });
  return *std::max_element(seconds.begin(), seconds.end());
}

}  // namespace mmdkernels
