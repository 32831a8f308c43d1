// The few-row linear kernel's measured choice of weight-row blocking (blocking.h).
#include "linear/blocking.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <tuple>

namespace mmdkernels::linear {
namespace {

constexpr const char* kEnv = "MMDKERNELS_LINEAR_BLOCKING";
constexpr int kBlockingSamples = 8;   // timed calls per blocking before choosing (the fastest counts)
constexpr double kSingleMargin = 1.1;  // single rows must be this much faster than the blocks: noise keeps blocks

constexpr std::array<double, kBlockings> filled(double value) {
  std::array<double, kBlockings> values{};
  for (double& v : values) v = value;
  return values;
}

struct Measurement {
  int calls = 0;
  std::array<double, kBlockings> best = filled(std::numeric_limits<double>::infinity());
  bool decided = false;
  Blocking chosen = Blocking::kWide;
};

std::mutex g_mutex;  // guards g_measurements
std::map<BlockingKey, Measurement> g_measurements;

const char* name(Blocking b) {
  switch (b) {
    case Blocking::kWide: return "wide";
    case Blocking::kSpread: return "spread";
    case Blocking::kSingle: return "single";
    default: return "segments";
  }
}
const char* dtype_name(int weight_bytes) {
  return weight_bytes == 4 ? "float32" : (weight_bytes == 2 ? "bfloat16" : "int8");
}
double gb_per_s(const BlockingKey& key, double seconds) {
  return static_cast<double>(key.out_features) * key.dim * key.weight_bytes / seconds / 1e9;
}
// "wide, spread, single, segments"
std::string blocking_names() {
  std::string names;
  for (int b = 0; b < kBlockings; ++b) names += std::string(b == 0 ? "" : ", ") + name(static_cast<Blocking>(b));
  return names;
}

}  // namespace

bool BlockingKey::operator<(const BlockingKey& o) const {
  return std::tie(weight_bytes, rows, dim, out_features, threads) <
         std::tie(o.weight_bytes, o.rows, o.dim, o.out_features, o.threads);
}

BlockingPlan plan_blocking(const BlockingKey& key) {
  const char* env = std::getenv(kEnv);
  const std::string mode = env == nullptr || *env == '\0' ? "auto" : env;
  for (int b = 0; b < kBlockings; ++b)
    if (mode == name(static_cast<Blocking>(b))) return {static_cast<Blocking>(b), false, key};
  TORCH_CHECK(mode == "auto", kEnv, " must be one of auto, ", blocking_names(), "; got '", mode, "'");
  std::lock_guard<std::mutex> lock(g_mutex);
  const Measurement& m = g_measurements[key];
  if (m.decided) return {m.chosen, false, key};
  return {static_cast<Blocking>(m.calls % kBlockings), true, key};
}

void record_blocking(const BlockingPlan& plan, double seconds) {
  std::lock_guard<std::mutex> lock(g_mutex);
  Measurement& m = g_measurements[plan.key];
  if (m.decided) return;
  double& best = m.best[static_cast<int>(plan.blocking)];
  best = std::min(best, seconds);
  if (++m.calls < kBlockings * kBlockingSamples) return;
  m.decided = true;
  Blocking blocks = Blocking::kWide;  // the fastest of the blocked ones (all but single)
  for (const Blocking b : {Blocking::kSpread, Blocking::kSegments})
    if (m.best[static_cast<int>(b)] < m.best[static_cast<int>(blocks)]) blocks = b;
  m.chosen = m.best[static_cast<int>(Blocking::kSingle)] * kSingleMargin < m.best[static_cast<int>(blocks)]
                 ? Blocking::kSingle
                 : blocks;
  const char* verbose = std::getenv("MMDKERNELS_GEMM_VERBOSE");
  if (verbose != nullptr && std::string(verbose) == "1") {
    const BlockingKey& k = plan.key;
    std::string rates;  // "wide 16.5 GB/s, spread 22.6 GB/s, ..."
    for (int b = 0; b < kBlockings; ++b) {
      char rate[64];
      std::snprintf(rate, sizeof(rate), "%s%s %.1f GB/s", b == 0 ? "" : ", ", name(static_cast<Blocking>(b)),
                    gb_per_s(k, m.best[b]));
      rates += rate;
    }
    std::fprintf(stderr, "mmdkernels linear blocking: %s rows %lld dim %lld out %lld threads %d: %s -> %s\n",
                 dtype_name(k.weight_bytes), static_cast<long long>(k.rows), static_cast<long long>(k.dim),
                 static_cast<long long>(k.out_features), k.threads, rates.c_str(), name(m.chosen));
  }
}

std::string blocking_choices_json() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::ostringstream out;
  out << "[";
  bool first = true;
  for (const auto& [k, m] : g_measurements) {
    if (!m.decided) continue;
    out << (first ? "" : ", ") << "{\"dtype\": \"" << dtype_name(k.weight_bytes) << "\", \"rows\": " << k.rows
        << ", \"dim\": " << k.dim << ", \"out_features\": " << k.out_features << ", \"threads\": " << k.threads
        << ", \"chosen\": \"" << name(m.chosen) << "\", \"gb_per_s\": {";
    for (int b = 0; b < kBlockings; ++b)
      out << (b == 0 ? "" : ", ") << "\"" << name(static_cast<Blocking>(b)) << "\": " << gb_per_s(k, m.best[b]);
    out << "}}";
    first = false;
  }
  out << "]";
  return out.str();
}

}  // namespace mmdkernels::linear

TORCH_LIBRARY_IMPL(mmdkernels, CompositeExplicitAutograd, m) {
  m.impl("linear_blocking_choices", [] { return mmdkernels::linear::blocking_choices_json(); });
}
