// Which GEMM provider runs (gemm.h): the mode (MMDKERNELS_GEMM, read once, or set_mode) and, in "auto", a short
// measurement per shape class cached for the process. The measurement runs on the first call's own shape (M shrunk
// to ~1 GFLOP), with the same operand layouts, in the caller's context (inside a parallel region every provider runs
// single-threaded, as it will there), the providers interleaved over a few rounds, fastest round each, MKL kept
// unless another is clearly ahead. It holds one mutex, so the other threads of a parallel region wait for it instead
// of disturbing it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <tuple>

#include "gemm/gemm.h"

namespace mmdkernels {
namespace gemm {
namespace {

constexpr const char* kEnv = "MMDKERNELS_GEMM";
constexpr const char* kAllowed = "auto, mkl, onednn, own";
constexpr double kMeasureFlops = 1e9;  // largest product timed per round; bigger calls are timed with fewer rows
constexpr int kRounds = 5;
// Another provider must beat MKL (torch's own float32 path) by this factor to be chosen: where they are level
// (Intel), noise from a busy machine would otherwise flip the choice at random; where one is ahead (oneDNN on AMD
// Zen 5: 1.6-2x), it still wins.
constexpr double kMargin = 1.1;

enum class Mode { kAuto, kMkl, kOnednn, kOwn };

Mode parse_mode(const std::string& text, const char* where) {
  if (text == "auto") return Mode::kAuto;
  if (text == "mkl") return Mode::kMkl;
  if (text == "onednn") return Mode::kOnednn;
  if (text == "own") return Mode::kOwn;
  TORCH_CHECK(false, where, ": unknown GEMM path '", text, "'; expected one of ", kAllowed);
}

struct ShapeClass {
  int bucket_m, bucket_n, bucket_k;
  bool a_transposed, b_transposed;
  int threads;
  bool operator<(const ShapeClass& o) const {
    return std::tie(bucket_m, bucket_n, bucket_k, a_transposed, b_transposed, threads) <
           std::tie(o.bucket_m, o.bucket_n, o.bucket_k, o.a_transposed, o.b_transposed, o.threads);
  }
};

struct Choice {
  int64_t m, n, k;  // the measured shape
  Provider chosen;
  double gflops_mkl, gflops_onednn, gflops_own;
};

std::mutex g_mutex;  // guards everything below
bool g_mode_read = false;
Mode g_mode = Mode::kAuto;
std::map<ShapeClass, Choice> g_choices;

int bucket(int64_t v) {  // ceil(log2(v)): 2^(b-1) < v <= 2^b
  int b = 0;
  while ((int64_t(1) << b) < v) ++b;
  return b;
}

// a transposed row-major view has unit row stride (and is not also row-major)
bool is_transposed(const at::Tensor& t) { return t.stride(1) != 1 && t.size(1) > 1; }

Mode current_mode_locked() {
  if (!g_mode_read) {
    const char* env = std::getenv(kEnv);
    g_mode = (env == nullptr || env[0] == '\0') ? Mode::kAuto : parse_mode(env, kEnv);
    g_mode_read = true;
  }
  return g_mode;
}

at::Tensor operand_like(const at::Tensor& t, int64_t rows) {
  auto options = t.options().memory_format(at::MemoryFormat::Contiguous);
  if (is_transposed(t)) return at::full({t.size(1), rows}, 0.5, options).t();
  return at::full({rows, t.size(1)}, 0.5, options);
}

double seconds_of(Provider provider, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const auto start = std::chrono::steady_clock::now();
  multiply_into_with(provider, out, a, b);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

Choice measure(const at::Tensor& a, const at::Tensor& b) {
  const int64_t n = b.size(1), k = a.size(1);
  const int64_t m = std::max<int64_t>(
      1, std::min<int64_t>(a.size(0), static_cast<int64_t>(kMeasureFlops / (2.0 * std::max<int64_t>(n * k, 1)))));
  const auto ta = operand_like(a, m);
  const auto tb = is_transposed(b) ? at::full({n, k}, 0.25, b.options()).t() : at::full({k, n}, 0.25, b.options());
  auto out = at::empty({m, n}, a.options());
  bool onednn = onednn_available();
  double best_mkl = 1e30, best_onednn = 1e30, best_own = 1e30;
  seconds_of(Provider::kMkl, out, ta, tb);  // warm-up: first-call setup (oneDNN builds its kernel here)
  seconds_of(Provider::kOwn, out, ta, tb);
  if (onednn) {
    try {
      seconds_of(Provider::kOnednn, out, ta, tb);
    } catch (const c10::Error&) {  // a torch whose oneDNN matmul rejects this problem: not a candidate
      onednn = false;
    }
  }
  for (int round = 0; round < kRounds; ++round) {
    best_mkl = std::min(best_mkl, seconds_of(Provider::kMkl, out, ta, tb));
    if (onednn) best_onednn = std::min(best_onednn, seconds_of(Provider::kOnednn, out, ta, tb));
    best_own = std::min(best_own, seconds_of(Provider::kOwn, out, ta, tb));
  }
  const double flops = 2.0 * m * n * k;
  Choice choice{m, n, k, Provider::kMkl, flops / best_mkl / 1e9, onednn ? flops / best_onednn / 1e9 : 0.0,
                flops / best_own / 1e9};
  const double best_other = std::max(choice.gflops_onednn, choice.gflops_own);
  if (best_other > kMargin * choice.gflops_mkl) {
    choice.chosen = choice.gflops_own >= choice.gflops_onednn ? Provider::kOwn : Provider::kOnednn;
  }
  return choice;
}

}  // namespace

const char* provider_name(Provider provider) {
  switch (provider) {
    case Provider::kOnednn:
      return "onednn";
    case Provider::kOwn:
      return "own";
    default:
      return "mkl";
  }
}

Provider parse_provider(const std::string& name) {
  if (name == "mkl") return Provider::kMkl;
  if (name == "onednn") return Provider::kOnednn;
  if (name == "own") return Provider::kOwn;
  TORCH_CHECK(false, "gemm provider must be one of mkl, onednn, own; got '", name, "'");
}

std::string mode() {
  std::lock_guard<std::mutex> lock(g_mutex);
  switch (current_mode_locked()) {
    case Mode::kMkl:
      return "mkl";
    case Mode::kOnednn:
      return "onednn";
    case Mode::kOwn:
      return "own";
    default:
      return "auto";
  }
}

void set_mode(const std::string& text) {
  const Mode parsed = parse_mode(text, kEnv);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_mode = parsed;
  g_mode_read = true;
}

Provider choose(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const Mode mode = current_mode_locked();
  if (mode == Mode::kMkl) return Provider::kMkl;
  if (mode == Mode::kOnednn) return Provider::kOnednn;
  if (mode == Mode::kOwn) return Provider::kOwn;
  const ShapeClass key{bucket(a.size(0)), bucket(b.size(1)), bucket(a.size(1)), is_transposed(a), is_transposed(b),
                       at::in_parallel_region() ? 1 : at::get_num_threads()};
  auto found = g_choices.find(key);
  if (found == g_choices.end()) {
    found = g_choices.emplace(key, measure(a, b)).first;
    const Choice& c = found->second;
    const char* verbose = std::getenv("MMDKERNELS_GEMM_VERBOSE");
    if (verbose != nullptr && verbose[0] == '1') {
      std::fprintf(stderr,
                   "mmdkernels gemm: %lldx%lldx%lld (%s%s, %d threads): mkl %.1f, onednn %.1f, own %.1f GFLOP/s "
                   "-> %s\n",
                   static_cast<long long>(c.m), static_cast<long long>(c.n), static_cast<long long>(c.k),
                   key.a_transposed ? "t" : "n", key.b_transposed ? "t" : "n", key.threads, c.gflops_mkl,
                   c.gflops_onednn, c.gflops_own, provider_name(c.chosen));
    }
  }
  return found->second.chosen;
}

std::string choices_json() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::ostringstream json;
  json << "[";
  bool first = true;
  for (const auto& [key, c] : g_choices) {
    json << (first ? "" : ", ") << "{\"m\": " << c.m << ", \"n\": " << c.n << ", \"k\": " << c.k
         << ", \"layout\": \"" << (key.a_transposed ? "t" : "n") << (key.b_transposed ? "t" : "n")
         << "\", \"threads\": " << key.threads << ", \"chosen\": \"" << provider_name(c.chosen)
         << "\", \"gflops\": {\"mkl\": " << c.gflops_mkl << ", \"onednn\": " << c.gflops_onednn
         << ", \"own\": " << c.gflops_own << "}}";
    first = false;
  }
  json << "]";
  return json.str();
}

}  // namespace gemm
}  // namespace mmdkernels
