// A/B benchmark of the few-row linear kernels without torch (build and run: benchmarks/linear_kernel_ab.sh): the
// kernel of csrc/linear (FMA kernel "new" at its default blocking, other blockings "P<pass rows>R<weight rows>", the
// AMX tiles "amx" where the CPU has them, the segments blocking as the library runs it "seg") against "old" (csrc/linear at commit ed472bb or $MMDKERNELS_AB_OLD, renamed
// old_linear by the script; "amxold": that commit's AMX tiles) and, for float32 on AVX-512, "orig" (the kernel before commit 7982a14: one pass of all rows), interleaved
// round by round; GB/s of weights from the best round (1 thread: the thread's CPU time).
// usage: linear_kernel_ab MODE(hot|l3|dram) THREADS ROUNDS [TYPES=f32,bf16,i8] [MS=1,2,4,5,6,8,12,16] [FILTER]
//   hot: one 256 x 512 matrix (in L2) 64 times, and "new"'s share of the core's FMA peak; l3: 32 matrices 2048 x 512
//   (bench_linear.py's); dram: 256 of them
#include <immintrin.h>
#include <omp.h>
#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>
#include <utility>
#include <type_traits>

#include "old/linear/old_linear_kernel.h"
namespace old_linear = mmdkernels::old_linear;  // the script renames the old commit's namespace to this
#include "linear/linear_kernel.h"
#if defined(__AVX512F__)
#include "linear/linear_amx.h"
#include "linear/linear_amx_int8.h"
#if __has_include("old/linear/old_linear_amx.h")
#include "old/linear/old_linear_amx.h"
#define HAVE_OLD_AMX 1
#endif
static bool g_amx = mmdkernels::linear::amx::available();
#endif

namespace nl = mmdkernels::linear;
namespace ol = mmdkernels::old_linear;

static bool g_cpu_time = true;  // 1 thread: this thread's CPU time (the load of other jobs is not counted)
static double now() {
  timespec t;
  clock_gettime(g_cpu_time ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

template <typename T> struct Name;
template <> struct Name<float> { static constexpr const char* s = "f32"; };
template <> struct Name<uint16_t> { static constexpr const char* s = "bf16"; };
template <> struct Name<int8_t> { static constexpr const char* s = "i8"; };

using Fn = std::function<void(const float*, const void*, float*, int64_t, int64_t)>;
struct Variant { std::string name; Fn fn; std::vector<double> times; };

static int64_t N = 2048, D = 512, COUNT = 32;
static std::vector<float> scale_buf;

template <typename T, int M, int P, int R, int U = 1>
static Fn make_new() {
  return [](const float* x, const void* w, float* y, int64_t n0, int64_t n1) {
    nl::rows_block<T, M, P, R, U>(x, D, static_cast<const T*>(w), D, y, N, n0, n1,
                               nl::Epilogue{std::is_same_v<T, int8_t> ? scale_buf.data() : nullptr, nullptr, false});
  };
}
template <typename T, int M>
static Fn make_old() {
  return [](const float* x, const void* w, float* y, int64_t n0, int64_t n1) {
    ol::rows_block<T, M>(x, D, static_cast<const T*>(w), D, y, N, n0, n1,
                         ol::Epilogue{std::is_same_v<T, int8_t> ? scale_buf.data() : nullptr, nullptr, false});
  };
}
// The library's "segments" blocking at its own passes, R, U and pair loads (linear_cpu.cpp's segments table), of
// namespace NS: "seg" (nl) and the old commit's "segold" (ol, where it has rows_segments: OLD_SEGMENTS).
#define SEGMENTS_FN(NS)                                                                                              \
  [](const float* x, const void* w, float* y, int64_t n0, int64_t n1) {                                            \
    thread_local std::vector<float> ordered(D); /* x as the pair loads read it (linear_cpu.cpp does the same) */    \
    if constexpr (NS::bf16_pairs<T>(M)) NS::bf16_pair_order(x, D, ordered.data());                                 \
    NS::rows_segments<T, M, NS::kMaxPassRows, NS::wide_rows<T, M>(), NS::library_splits<T, M>(),                   \
                      NS::bf16_pairs<T>(M)>(                                                                       \
        NS::bf16_pairs<T>(M) ? ordered.data() : x, D, static_cast<const T*>(w), D, y, N, n0, n1,                   \
        NS::Epilogue{std::is_same_v<T, int8_t> ? scale_buf.data() : nullptr, nullptr, false});                     \
  }
template <typename T, int M>
static Fn make_segments() {
  return SEGMENTS_FN(nl);
}
#if OLD_SEGMENTS
template <typename T, int M>
static Fn make_old_segments() {
  return SEGMENTS_FN(ol);
}
#endif
// The float32 kernel before commit 7982a14 (AVX-512 only: its vectors are 16 lanes).
#if defined(__AVX512F__)
namespace orig_linear {
constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(sizeof(float))));
constexpr int block_rows(int m) { return m <= 2 ? 8 : (m <= 8 ? 2 : 1); }
constexpr int64_t kPrefetchFloats = 4096;
static inline float lane_sum(Vec v) {
  float total = 0.f;
  for (int lane = 0; lane < kLanes; ++lane) total += v[lane];
  return total;
}
template <int M>
static void rows_block(const float* x, int64_t ldx, const float* weight, int64_t dim, float* y, int64_t ldy,
                       int64_t n_begin, int64_t n_end) {
  constexpr int R = block_rows(M);
  const int64_t full = dim - dim % kLanes;
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) {
    Vec acc[M][R];
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = Vec{};
    const float* w = weight + n * dim;
    for (int64_t k = 0; k < full; k += kLanes) {
      Vec wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        __builtin_prefetch(w + r * dim + k + kPrefetchFloats, 0, 1);
        wv[r] = *reinterpret_cast<const Vec*>(w + r * dim + k);
      }
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        const Vec xv = *reinterpret_cast<const Vec*>(x + m * ldx + k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[m][r] += xv * wv[r];
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        float total = lane_sum(acc[m][r]);
        for (int64_t k = full; k < dim; ++k) total += x[m * ldx + k] * w[r * dim + k];
        y[m * ldy + n + r] = total;
      }
  }
  for (; n < n_end; ++n) {
    const float* w = weight + n * dim;
    for (int m = 0; m < M; ++m) {
      Vec acc = Vec{};
      for (int64_t k = 0; k < full; k += kLanes)
        acc += *reinterpret_cast<const Vec*>(x + m * ldx + k) * *reinterpret_cast<const Vec*>(w + k);
      float total = lane_sum(acc);
      for (int64_t k = full; k < dim; ++k) total += x[m * ldx + k] * w[k];
      y[m * ldy + n] = total;
    }
  }
}
}  // namespace orig_linear
#else
namespace orig_linear {
template <int M>
void rows_block(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t) {}
}  // namespace orig_linear
#endif
template <int M>
static Fn make_orig() {
  return [](const float* x, const void* w, float* y, int64_t n0, int64_t n1) {
    orig_linear::rows_block<M>(x, D, static_cast<const float*>(w), D, y, N, n0, n1);
  };
}

template <typename T, int M, int P, int R, int U = 1>
static void add(std::vector<Variant>& vs) {
  constexpr int kRows = nl::pass_rows(M, P);
  constexpr int kVectorsPerLine = 64 / sizeof(T) / nl::kLanes;
  if constexpr (kRows * R * U + R + 1 <= (nl::kLanes == 16 ? 32 : 16) && R <= 8 && (8 % R == 0) &&
                kVectorsPerLine % U == 0)
    vs.push_back({"P" + std::to_string(P) + "R" + std::to_string(R) + (U > 1 ? "U" + std::to_string(U) : ""),
                  make_new<T, M, P, R, U>(), {}});
}

template <typename T, int M>
static std::vector<Variant> variants() {
  std::vector<Variant> vs;
  vs.push_back({"old", make_old<T, M>(), {}});
  vs.push_back({"new", make_new<T, M, nl::kMaxPassRows, nl::block_rows(nl::pass_rows(M, nl::kMaxPassRows))>(), {}});
  if constexpr (std::is_same_v<T, float> && nl::kLanes == 16) vs.push_back({"orig", make_orig<M>(), {}});
  vs.push_back({"seg", make_segments<T, M>(), {}});
#if OLD_SEGMENTS
  vs.push_back({"segold", make_old_segments<T, M>(), {}});
#endif
  add<T, M, 4, 1>(vs); add<T, M, 4, 2>(vs); add<T, M, 4, 4>(vs);
  add<T, M, 4, 1, 2>(vs); add<T, M, 4, 1, 4>(vs); add<T, M, 4, 1, 8>(vs); add<T, M, 4, 2, 2>(vs);
  if constexpr (M > 4) { add<T, M, 8, 1>(vs); add<T, M, 8, 2>(vs); add<T, M, 6, 2>(vs); add<T, M, 6, 4>(vs); }
  if constexpr (M > 8) add<T, M, 16, 1>(vs);
  if constexpr (M <= 2) { add<T, M, 4, 8>(vs); add<T, M, 4, 4, 2>(vs); }
#if defined(__AVX512F__)
  if (g_amx) {
#if defined(HAVE_OLD_AMX)
    if constexpr (!std::is_same_v<T, float> && (OLD_AMX_INT8 || !std::is_same_v<T, int8_t>))
      vs.push_back({"amxold", [](const float* x, const void* w, float* y, int64_t n0, int64_t n1) {
                      namespace ax = old_linear::amx;
                      thread_local std::vector<uint16_t> packed;
                      packed.resize(ax::packed_size(M, D));
                      ax::pack_x(x, D, M, D, packed.data());
                      ax::rows_block<T>(packed.data(), x, D, M, static_cast<const T*>(w), D, y, N, n0, n1,
                                        ol::Epilogue{std::is_same_v<T, int8_t> ? scale_buf.data() : nullptr, nullptr, false});
                    }, {}});
#endif
    if constexpr (!std::is_same_v<T, int8_t>)  // int8: "amx8" below (the bfloat16 tiles took int8 until 2026-12)
      vs.push_back({"amx", [](const float* x, const void* w, float* y, int64_t n0, int64_t n1) {
                    namespace ax = mmdkernels::linear::amx;
                    thread_local std::vector<uint16_t> packed;
                    packed.resize(ax::packed_size(M, D));
                    ax::pack_x(x, D, M, D, packed.data());
                    ax::rows_block<T>(packed.data(), x, D, M, static_cast<const T*>(w), D, y, N, n0, n1,
                                      nl::Epilogue{std::is_same_v<T, int8_t> ? scale_buf.data() : nullptr, nullptr, false});
                  }, {}});
    if constexpr (std::is_same_v<T, int8_t>)  // "amx8": int8 weights on AMX-INT8 tiles, x as four 8-bit digits
      if (nl::amx::int8_available())
        vs.push_back({"amx8", [](const float* x, const void* w, float* y, int64_t n0, int64_t n1) {
                        namespace ax = mmdkernels::linear::amx;
                        thread_local std::vector<int8_t> packed;
                        double inverse_scale[16];
                        packed.resize(ax::digits_packed_bytes(M, D));
                        ax::pack_digits(x, D, M, D, packed.data(), inverse_scale);
                        ax::digit_rows_kernel(M)(packed.data(), inverse_scale, x, D, M, static_cast<const int8_t*>(w),
                                                 D, y, N, n0, n1, nl::Epilogue{scale_buf.data(), nullptr, false});
                      }, {}});
  }
#endif
  return vs;
}

// Vector FMAs per second of this core: 10 independent chains held in registers (their latency hidden), so the rate
// is the FMA ports' throughput. A kernel at M rows does M FMAs per weight vector: the "FMA share" below is the
// kernel's rate against this peak (hot mode), how close a case is to being bound by its arithmetic.
static double fma_peak() {
  using V = nl::Vec;
  V a0{}, a1{}, a2{}, a3{}, a4{}, a5{}, a6{}, a7{}, a8{}, a9{};
  V b = V{} + 0.999f, c = V{} + 0.001f;
  const int64_t iterations = 50000000;
  double best = 1e9;
  for (int r = 0; r < 3; ++r) {
    const double t0 = now();
    for (int64_t i = 0; i < iterations; ++i) {
      a0 = a0 * b + c; a1 = a1 * b + c; a2 = a2 * b + c; a3 = a3 * b + c; a4 = a4 * b + c;
      a5 = a5 * b + c; a6 = a6 * b + c; a7 = a7 * b + c; a8 = a8 * b + c; a9 = a9 * b + c;
      asm volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7), "+v"(a8),
                   "+v"(a9));
    }
    best = std::min(best, now() - t0);
  }
  return 10.0 * iterations / best;
}
static double g_fma_peak = 0;

template <typename T>
static void fill(std::vector<T>& w, std::mt19937& gen) {
  std::normal_distribution<float> nd;
  for (auto& v : w) {
    float f = nd(gen);
    if constexpr (std::is_same_v<T, float>) v = f;
    else if constexpr (std::is_same_v<T, uint16_t>) { uint32_t b; memcpy(&b, &f, 4); v = b >> 16; }
    else v = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::round(f * 30))));
  }
}

template <typename T, int M>
static void run_case(int threads, int rounds, const std::string& filter) {
  std::mt19937 gen(0);
  const bool hot = N == 256;
  std::vector<T> w(static_cast<size_t>(hot ? 1 : COUNT) * N * D);
  fill(w, gen);
  std::vector<float> x(M * D), y(M * N), yref(M * N);
  std::normal_distribution<float> nd;
  for (auto& v : x) v = nd(gen);
  auto vs = variants<T, M>();
  if (!filter.empty()) {
    std::vector<Variant> keep;
    for (auto& v : vs) if (v.name == "old" || v.name == "new" || filter.find(v.name) != std::string::npos) keep.push_back(v);
    vs = keep;
  }
  const int64_t groups = N / 8;
  auto sweep = [&](Variant& v, float* out) {
    for (int64_t c = 0; c < COUNT; ++c) {
      const T* wc = w.data() + (hot ? 0 : c * N * D);
      if (threads == 1) v.fn(x.data(), wc, out, 0, N);
      else {
#pragma omp parallel num_threads(threads)
        {
          int t = omp_get_thread_num();
          int64_t g0 = groups * t / threads, g1 = groups * (t + 1) / threads;
          v.fn(x.data(), wc, out, g0 * 8, g1 * 8);
        }
      }
    }
  };
  // correctness vs "old" on the last matrix
  sweep(vs[0], yref.data());
  for (auto& v : vs) {
    std::fill(y.begin(), y.end(), NAN);
    sweep(v, y.data());
    double err = 0, mx = 0;
    for (size_t i = 0; i < y.size(); ++i) { err = std::max(err, (double)std::fabs(y[i] - yref[i])); mx = std::max(mx, (double)std::fabs(yref[i])); }
    if (!(err <= 1e-5 * mx + 1e-6)) printf("MISMATCH %s %s M=%d: %g of %g\n", Name<T>::s, v.name.c_str(), M, err, mx);
  }
  for (int r = 0; r < rounds; ++r)
    for (size_t i = 0; i < vs.size(); ++i) {
      auto& v = vs[(i + r) % vs.size()];
      double t0 = now();
      sweep(v, y.data());
      v.times.push_back(now() - t0);
    }
  const double bytes = double(COUNT) * N * D * sizeof(T);
  double old_best = *std::min_element(vs[0].times.begin(), vs[0].times.end());
  printf("%-4s M=%-2d", Name<T>::s, M);
  for (auto& v : vs) {
    double best = *std::min_element(v.times.begin(), v.times.end());
    printf("  %s %.1f(%.2f)", v.name.c_str(), bytes / best / 1e9, old_best / best);
  }
  printf("   [GB/s (speed vs old)]\n");
  if (hot) {  // M FMAs per weight vector
    const double best = *std::min_element(vs[1].times.begin(), vs[1].times.end());
    printf("     %s: FMA share %.2f (%.2f G vector FMAs/s of %.2f)\n", vs[1].name.c_str(),
           bytes / sizeof(T) / nl::kLanes * M / best / g_fma_peak, bytes / sizeof(T) / nl::kLanes * M / best / 1e9,
           g_fma_peak / 1e9);
  }
#if defined(HAVE_OLD_AMX)
  // x packed for the tiles alone, old against new in turn (best of 200), and whether they wrote the same bytes
  if (g_amx && filter.find("amxold") != std::string::npos) {
    std::vector<uint16_t> packed_old(nl::amx::packed_size(M, D)), packed_new(packed_old.size());
    double best_old = 1e9, best_new = 1e9;
    for (int r = 0; r < 200; ++r) {
      const double t0 = now();
      ol::amx::pack_x(x.data(), D, M, D, packed_old.data());
      const double t1 = now();
      nl::amx::pack_x(x.data(), D, M, D, packed_new.data());
      best_old = std::min(best_old, t1 - t0);
      best_new = std::min(best_new, now() - t1);
    }
    printf("     pack x, %d rows, D = %lld: amxold %.2f us, amx %.2f us (%.2fx)%s\n", M, static_cast<long long>(D),
           best_old * 1e6, best_new * 1e6, best_old / best_new, packed_old == packed_new ? "" : "  PACKED BYTES DIFFER");
  }
#endif
  fflush(stdout);
}

template <typename T>
static void run_type(int threads, int rounds, const std::string& ms, const std::string& filter) {
  auto has = [&](const char* m) { return ("," + ms + ",").find(std::string(",") + m + ",") != std::string::npos; };
  if (has("1")) run_case<T, 1>(threads, rounds, filter);
  if (has("2")) run_case<T, 2>(threads, rounds, filter);
  if (has("4")) run_case<T, 4>(threads, rounds, filter);
  if (has("5")) run_case<T, 5>(threads, rounds, filter);
  if (has("6")) run_case<T, 6>(threads, rounds, filter);
  if (has("8")) run_case<T, 8>(threads, rounds, filter);
  if (has("12")) run_case<T, 12>(threads, rounds, filter);
  if (has("16")) run_case<T, 16>(threads, rounds, filter);
}

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "l3";
  int threads = argc > 2 ? atoi(argv[2]) : 1, rounds = argc > 3 ? atoi(argv[3]) : 7;
  std::string types = argc > 4 ? argv[4] : "f32,bf16,i8", ms = argc > 5 ? argv[5] : "1,2,4,8,16";
  std::string filter = argc > 6 ? argv[6] : "";
  if (mode == "hot") { N = 256; COUNT = 64; }
  if (mode == "dram") COUNT = 256;
  if (const char* shape = getenv("MMDKERNELS_AB_SHAPE")) {  // "NxD": weight matrices of N rows of D, same bytes
    const int64_t bytes = COUNT * N * D;
    sscanf(shape, "%ldx%ld", &N, &D);
    COUNT = std::max<int64_t>(1, bytes / (N * D));
  }
  scale_buf.assign(N, 0.01f);
  g_cpu_time = threads == 1;
  if (mode == "hot") g_fma_peak = fma_peak();
  printf("mode %s threads %d rounds %d, %lld x %lld x %lld, lanes %d\n", mode.c_str(), threads, rounds, (long long)COUNT, (long long)N, (long long)D, nl::kLanes);
  if (types.find("f32") != std::string::npos) run_type<float>(threads, rounds, ms, filter);
  if (types.find("bf16") != std::string::npos) run_type<uint16_t>(threads, rounds, ms, filter);
  if (types.find("i8") != std::string::npos) run_type<int8_t>(threads, rounds, ms, filter);
}
