// Fused residual VQ on the CPU: all K stages of nearest-neighbour encoding in one pass over blocks of rows, and the
// decode gather-sum. Each thread owns blocks of kRowsPerBlock frames whose residuals stay in its cache through all K
// stages; per stage, each row's nearest entry comes from one of two tile kernels, chosen by measurement (below):
// "gemm": the score tile (rows x a chunk of entries) from one single-threaded GEMM (gemm.h: MKL or oneDNN,
// whichever measured faster here), then a vectorised scan into a running (min score, lowest index) per row;
// "fused": our micro-kernel with the argmin in its epilogue (rvq_fused.h: no score tile is written). The chosen
// entries are subtracted from the residuals before the next stage. Nothing of size N x C is ever allocated. float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/measure.h"
#include "gemm/gemm.h"
#include "rvq/rvq_fused.h"
#include "rvq/rvq_tile.h"

namespace mmdkernels {
namespace rvq {
namespace {

constexpr int64_t kRowsPerBlock = 512;
constexpr int32_t kLanes = 16;  // running minima kept per SIMD lane in the argmin scan
constexpr int64_t kEntriesPerChunk = 2048;  // score tile: 64 x 2048 floats = 512 KiB, in a core's L2

// Lowest index of the minimum of score[c] = sqnorms[c] - 2 dots[c] over c in [0, len), as (score, offset + index):
// one vectorised pass keeps a running (min, first index) per SIMD lane, then the lanes are merged with better_of
// (lowest score, ties to the lowest index), which gives the first minimum of the whole row.
ScoredIndex best_in_chunk(const float* sqnorms, const float* dots, int64_t len, int64_t offset) {
  float lane_score[kLanes];
  int32_t lane_index[kLanes];
  std::fill(lane_score, lane_score + kLanes, std::numeric_limits<float>::infinity());
  std::fill(lane_index, lane_index + kLanes, 0);
  int64_t c0 = 0;
#if defined(__AVX512F__)
  // The same running minima with the lanes held in two registers (GCC keeps the portable loop's lane arrays in
  // memory). sqnorm - 2 dot rounds once either way (2 dot is exact), so the scores equal entry_score's.
  __m512 best_scores = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512i best_ids = _mm512_setzero_si512();
  __m512i ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 two = _mm512_set1_ps(2.0f);
  for (; c0 + kLanes <= len; c0 += kLanes) {
    const __m512 scores =
        _mm512_sub_ps(_mm512_loadu_ps(sqnorms + c0), _mm512_mul_ps(two, _mm512_loadu_ps(dots + c0)));
    const __mmask16 better = _mm512_cmp_ps_mask(scores, best_scores, _CMP_LT_OQ);
    best_scores = _mm512_mask_mov_ps(best_scores, better, scores);
    best_ids = _mm512_mask_mov_epi32(best_ids, better, ids);
    ids = _mm512_add_epi32(ids, _mm512_set1_epi32(kLanes));
  }
  _mm512_storeu_ps(lane_score, best_scores);
  _mm512_storeu_si512(lane_index, best_ids);
#else
  for (; c0 + kLanes <= len; c0 += kLanes) {
#pragma omp simd
    for (int32_t lane = 0; lane < kLanes; ++lane) {
      const float score = entry_score(sqnorms[c0 + lane], dots[c0 + lane]);
      const bool better = score < lane_score[lane];
      lane_score[lane] = better ? score : lane_score[lane];
      lane_index[lane] = better ? static_cast<int32_t>(c0) + lane : lane_index[lane];
    }
  }
#endif
  ScoredIndex best = no_candidate();
  for (int32_t lane = 0; c0 > 0 && lane < kLanes; ++lane) {
    best = better_of(best, {lane_score[lane], offset + lane_index[lane]});
  }
  for (int64_t c = c0; c < len; ++c) best = better_of(best, {entry_score(sqnorms[c], dots[c]), offset + c});
  return best;
}

void check_encode_inputs(const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& sqnorms) {
  MMD_CHECK_DEVICE(x, at::Device(at::kCPU));
  MMD_CHECK_DTYPE(x, at::kFloat);
  MMD_CHECK_DIM(x, 2);
  MMD_CHECK_CONTIGUOUS(x);
  MMD_CHECK_DEVICE(codebooks, at::Device(at::kCPU));
  MMD_CHECK_DTYPE(codebooks, at::kFloat);
  MMD_CHECK_DIM(codebooks, 3);
  MMD_CHECK_CONTIGUOUS(codebooks);
  TORCH_CHECK(codebooks.size(0) >= 1 && codebooks.size(1) >= 1, "codebooks must have shape [K >= 1, C >= 1, D], got ",
              codebooks.sizes());
  TORCH_CHECK(codebooks.size(2) == x.size(1), "codebooks must have D = ", x.size(1), " (x's dim 1), got shape ",
              codebooks.sizes());
  MMD_CHECK_DTYPE(sqnorms, at::kFloat);
  MMD_CHECK_SHAPE(sqnorms, codebooks.size(0), codebooks.size(1));
  MMD_CHECK_CONTIGUOUS(sqnorms);
}

// The nearest entry of each of `rows` residuals (row stride dim) in entries [c0, c0 + chunk) of one stage, via the
// GEMM: one score tile per chunk of entries. best must hold `rows` candidates (reset by the caller).
void best_by_gemm(const float* residual, int64_t rows, int64_t dim, const float* book, const float* norms,
                  int64_t num_entries, int64_t chunk, float* dots, ScoredIndex* best) {
  for (int64_t c0 = 0; c0 < num_entries; c0 += chunk) {
    const int64_t len = std::min(chunk, num_entries - c0);
    // dots [rows, len] = residual [rows, dim] @ entries [len, dim]^T
    gemm::matmul_nt(dots, len, residual, dim, book + c0 * dim, dim, rows, len, dim);
    for (int64_t i = 0; i < rows; ++i) {
      best[i] = better_of(best[i], best_in_chunk(norms + c0, dots + i * len, len, c0));
    }
  }
}

void best_by_fused(const float* residual, int64_t rows, int64_t dim, const fused::PackedStage& packed,
                   fused::LaneBest& lanes, ScoredIndex* best) {
  lanes.reset(rows);
  fused::score_rows(residual, dim, rows, packed, lanes);
  for (int64_t i = 0; i < rows; ++i) best[i] = lanes.merged(i);
}

// Which tile kernel encodes: MMDKERNELS_RVQ_TILE=gemm|fused forces one (read at every call, so tests can switch);
// auto (the default) measures both on the first call of a shape class (rows per block, entries and dim bucketed to
// powers of two, threads, whether blocks run one per thread) and keeps the faster for the process, as the GEMM
// choice does (gemm.h).
enum class TileKernel { kGemm, kFused };
constexpr const char* kTileEnv = "MMDKERNELS_RVQ_TILE";

// Times one block of rows of stage 0 both ways, alternating rounds, as the encode will run it: with several blocks
// and threads, every block runs on one thread inside a parallel region (its GEMM single-threaded), so every thread
// times a block of its own at once (on_every_worker, common/measure.h; the slowest thread's time counts); with one
// block or one thread, the encode runs outside a region and so does the measurement (the GEMM then takes every
// thread). The fused kernel is charged its share of the per-call packing (rows / n of one stage's pack).
bool blocks_per_thread(int64_t n) {
  return n > kRowsPerBlock && at::get_num_threads() > 1 && !at::in_parallel_region();
}

TileKernel measure_tile_kernel(const float* x, int64_t n, int64_t dim, const float* book, const float* norms,
                               int64_t num_entries, int64_t chunk) {
  const int64_t rows = std::min(n, kRowsPerBlock);
  const bool spread = blocks_per_thread(n);
  const int64_t workers = spread ? at::get_num_threads() : 1;
  constexpr double kNever = std::numeric_limits<double>::infinity();
  std::vector<double> gemm_times(workers, kNever), fused_times(workers, kNever);
  fused::PackedStage packed;
  const double pack_s = best_seconds(2, [&] { packed = fused::pack_stage(book, norms, num_entries, dim); });
  const auto measure = [&](int64_t worker) {
    std::vector<float> dots(rows * chunk);
    std::vector<ScoredIndex> best(rows);
    fused::LaneBest lanes;
    for (int round = 0; round < 3; ++round) {
      gemm_times[worker] = std::min(gemm_times[worker], best_seconds(1, [&] {
                                      std::fill(best.begin(), best.end(), no_candidate());
                                      best_by_gemm(x, rows, dim, book, norms, num_entries, chunk, dots.data(),
                                                   best.data());
                                    }));
      fused_times[worker] = std::min(fused_times[worker], best_seconds(1, [&] {
                                       best_by_fused(x, rows, dim, packed, lanes, best.data());
                                     }));
    }
  };
  on_every_worker(workers, measure);
  const double gemm_s = *std::max_element(gemm_times.begin(), gemm_times.end());
  double fused_s = *std::max_element(fused_times.begin(), fused_times.end());
  fused_s += pack_s * static_cast<double>(rows) / static_cast<double>(n);
  const TileKernel chosen = fused_s < gemm_s ? TileKernel::kFused : TileKernel::kGemm;
  const char* verbose = std::getenv("MMDKERNELS_GEMM_VERBOSE");
  if (verbose != nullptr && std::string(verbose) == "1") {
    std::fprintf(stderr, "mmdkernels rvq tile: rows %lld entries %lld dim %lld, %s: gemm %.3g s, fused %.3g s -> %s\n",
                 static_cast<long long>(rows), static_cast<long long>(num_entries), static_cast<long long>(dim),
                 spread ? "a block per thread" : "one block", gemm_s, fused_s,
                 chosen == TileKernel::kFused ? "fused" : "gemm");
  }
  return chosen;
}

TileKernel choose_tile_kernel(const float* x, int64_t n, int64_t dim, const float* book, const float* norms,
                              int64_t num_entries, int64_t chunk) {
  const char* env = std::getenv(kTileEnv);
  const std::string mode = env == nullptr || *env == '\0' ? "auto" : env;
  if (mode == "gemm") return TileKernel::kGemm;
  if (mode == "fused") return TileKernel::kFused;
  TORCH_CHECK(mode == "auto", kTileEnv, " must be one of auto, gemm, fused; got '", mode, "'");
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, int64_t, int64_t, int, bool>, TileKernel> chosen;
  const auto key = std::make_tuple(pow2_bucket(std::min(n, kRowsPerBlock)), pow2_bucket(num_entries), pow2_bucket(dim),
                                   at::get_num_threads(), blocks_per_thread(n));
  std::lock_guard<std::mutex> lock(mutex);
  auto it = chosen.find(key);
  if (it == chosen.end()) {
    it = chosen.emplace(key, measure_tile_kernel(x, n, dim, book, norms, num_entries, chunk)).first;
  }
  return it->second;
}

std::tuple<at::Tensor, at::Tensor> rvq_encode_cpu(const at::Tensor& x, const at::Tensor& codebooks,
                                                  const at::Tensor& sqnorms, bool return_quantized) {
  check_encode_inputs(x, codebooks, sqnorms);
  const int64_t n = x.size(0), dim = x.size(1);
  const int64_t num_codebooks = codebooks.size(0), num_entries = codebooks.size(1);
  auto codes = at::empty({n, num_codebooks}, x.options().dtype(at::kLong));
  auto quantized = return_quantized ? at::empty({n, num_codebooks, dim}, x.options()) : at::empty({0}, x.options());
  if (n == 0) return {codes, quantized};
  const float* book_data = codebooks.data_ptr<float>();
  const float* norm_data = sqnorms.data_ptr<float>();
  int64_t* code_data = codes.data_ptr<int64_t>();
  float* quantized_data = return_quantized ? quantized.data_ptr<float>() : nullptr;
  const int64_t chunk = std::min(num_entries, kEntriesPerChunk);
  const float* x_data = x.data_ptr<float>();

  const TileKernel kernel = choose_tile_kernel(x_data, n, dim, book_data, norm_data, num_entries, chunk);
  std::vector<fused::PackedStage> packed(kernel == TileKernel::kFused ? num_codebooks : 0);
  at::parallel_for(0, static_cast<int64_t>(packed.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      packed[k] = fused::pack_stage(book_data + entry_offset(k, 0, num_entries, dim), norm_data + k * num_entries,
                                    num_entries, dim);
    }
  });

  at::parallel_for(0, n, kRowsPerBlock, [&](int64_t begin, int64_t end) {
    std::vector<float> residual(kRowsPerBlock * dim);
    std::vector<float> dots(kernel == TileKernel::kGemm ? kRowsPerBlock * chunk : 0);
    std::vector<ScoredIndex> best(kRowsPerBlock);
    fused::LaneBest lanes;
    for (int64_t row0 = begin; row0 < end; row0 += kRowsPerBlock) {
      const int64_t rows = std::min(kRowsPerBlock, end - row0);
      std::copy(x_data + row0 * dim, x_data + (row0 + rows) * dim, residual.begin());
      for (int64_t k = 0; k < num_codebooks; ++k) {
        if (kernel == TileKernel::kFused) {
          best_by_fused(residual.data(), rows, dim, packed[k], lanes, best.data());
        } else {
          std::fill(best.begin(), best.end(), no_candidate());
          best_by_gemm(residual.data(), rows, dim, book_data + entry_offset(k, 0, num_entries, dim),
                       norm_data + k * num_entries, num_entries, chunk, dots.data(), best.data());
        }
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t code = best[i].index == no_candidate().index ? 0 : best[i].index;  // an all-NaN row
          const float* entry = book_data + entry_offset(k, code, num_entries, dim);
          float* r = residual.data() + i * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) r[d] -= entry[d];
          code_data[(row0 + i) * num_codebooks + k] = code;
          if (quantized_data != nullptr) {
            std::copy(entry, entry + dim, quantized_data + quantized_offset(row0 + i, k, num_codebooks, dim));
          }
        }
      }
    }
  });
  return {codes, quantized};
}

at::Tensor rvq_decode_cpu(const at::Tensor& codes, const at::Tensor& codebooks) {
  MMD_CHECK_DTYPE(codes, at::kLong);
  MMD_CHECK_DIM(codes, 2);
  MMD_CHECK_DTYPE(codebooks, at::kFloat);
  MMD_CHECK_DIM(codebooks, 3);
  MMD_CHECK_CONTIGUOUS(codebooks);
  TORCH_CHECK(codes.size(1) == codebooks.size(0), "codes must have K = ", codebooks.size(0),
              " columns (codebooks' dim 0), got shape ", codes.sizes());
  const auto codes_c = codes.contiguous();
  const int64_t n = codes.size(0), num_codebooks = codebooks.size(0), num_entries = codebooks.size(1);
  const int64_t dim = codebooks.size(2);
  if (n > 0) {
    const int64_t lowest = codes_c.min().item<int64_t>(), highest = codes_c.max().item<int64_t>();
    TORCH_CHECK(lowest >= 0 && highest < num_entries, "codes must be in [0, ", num_entries, "), got values in [",
                lowest, ", ", highest, "]");
  }
  auto out = at::empty({n, dim}, codebooks.options());
  const int64_t* code_data = codes_c.data_ptr<int64_t>();
  const float* book_data = codebooks.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* o = out_data + row * dim;
      const float* first = book_data + code_data[row * num_codebooks] * dim;
      std::copy(first, first + dim, o);
      for (int64_t k = 1; k < num_codebooks; ++k) {
        const float* entry = book_data + (k * num_entries + code_data[row * num_codebooks + k]) * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] += entry[d];
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace rvq
}  // namespace mmdkernels

TORCH_LIBRARY_IMPL(mmdkernels, CPU, m) {
  m.impl("rvq_encode", &mmdkernels::rvq::rvq_encode_cpu);
  m.impl("rvq_decode", &mmdkernels::rvq::rvq_decode_cpu);
}
