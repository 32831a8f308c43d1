// dHSIC V-statistic of codebook groups on the CPU: the shuffle-free estimator of the same MMD, loss and gradient.
// Two passes over tiles of per-codebook distances (1 MiB tile budget so the K tiles stay in L2 between their product
// and the pass over them; the Grams are symmetric, so each pair of row blocks is visited once and a mirrored tile also
// feeds its columns). A tile comes from one GEMM per codebook (dot products) or from our micro-kernel with the
// distance epilogue fused (gram_fused.h), whichever measured faster for the shape class (GramTiles below). Pass 1
// reduces each Gram matrix E_{k,j} to row sums and each group's joint Gram prod_{k in g} E_{k,j} =
// e_j(sum_{k in g} d_k) (one bandwidth chain on the group's distance) to a sum; the loss follows from those O(K A N)
// numbers (dhsic_statistics in dhsic_stats.h, shared with CUDA). Pass 2 (only for the gradient) recomputes the tiles
// and overwrites them with the symmetrised weights W_k (dhsic_entry_weight in mmd_tile.h, regrouped below), summing
// them on the way, then adds 2 (rowsum(W_k) z^k - W_k @ z^k) per codebook (and the transposed column side of a
// mirrored tile). The tiles run in rounds on disjoint rows, one tile per thread (TileSchedule below).
// Nothing N x N is stored; sums of a chunk run in float lanes and accumulate in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "common/measure.h"
#include "mmd/chain_fixed.h"
#include "mmd/dhsic_stats.h"
#include "mmd/gram_fused.h"
#include "mmd/tiles_cpu.h"

namespace mmdkernels {
namespace mmd {
namespace {

// Tile budget of the dHSIC plane: K dot tiles of 256 rows x 256 columns at K = 4 (1 MiB), in L2 from the GEMM to the
// pass over them; on packed operands MKL runs 256 x 256 x 128 as fast as 256 x 1024 x 128 (benchmarks/RESULTS.md).
constexpr int64_t kDhsicTileBudgetFloats = int64_t(1) << 18;
// Rows a float column sum runs over before it is added into double.
constexpr int64_t kColumnFlushRows = 32;

// Per-thread scratch for one chunk of a row: per-codebook distances and the kernels of one distance vector.
struct DhsicScratch {
  int64_t num_codebooks;
  std::vector<float> dist;        // [K][kChunk]
  std::vector<float> group_dist;  // [kChunk]
  std::vector<float> kernel_buf;  // [kMaxBandwidths][kChunk]
  explicit DhsicScratch(int64_t k) : num_codebooks(k), dist(k * kChunk), group_dist(kChunk),
                                     kernel_buf(kMaxBandwidths * kChunk) {}
  float* distances(int64_t k) { return dist.data() + k * kChunk; }
  float (*kernels())[kChunk] { return reinterpret_cast<float(*)[kChunk]>(kernel_buf.data()); }

  // Distances d_k of the tile's row i against columns [col0, col0 + len) (c0 within the tile), every codebook,
  // from the plane's dot products (or its distances: `distances`); the diagonal exactly 0 and near duplicates
  // recomputed from the difference.
  void load(const TilePlane& plane, const Tile& tile, bool distances, const at::Tensor& z, const float* norms,
            int64_t n, int64_t i, int64_t c0, int64_t len) {
    const float* z_data = z.data_ptr<float>();
    const int64_t width = z.size(2), stride = num_codebooks * width, row = tile.row0 + i, col0 = tile.col0 + c0;
    for (int64_t k = 0; k < num_codebooks; ++k) {
      const float* dots = plane.row(k, tile, i) + c0;
      const float norm_row = norms[k * n + row];
      const float* norm_cols = norms + k * n + col0;
      float* d = this->distances(k);
      int flagged = 1;
      if (distances) {
        std::copy(dots, dots + len, d);
      } else {
        // the near-duplicate test of refine_near_duplicates on the way, which then runs only where it has work
        flagged = 0;
#pragma omp simd reduction(+ : flagged)
        for (int64_t m = 0; m < len; ++m) {
          d[m] = sqdist_from_dot(norm_row, norm_cols[m], dots[m]);
          flagged += d[m] <= kNearDuplicate * (norm_row + norm_cols[m]) ? 1 : 0;
        }
        // the diagonal entry (set to 0 below) is always flagged: alone it needs no refinement
        const bool diagonal_here = row >= col0 && row < col0 + len;
        if (flagged == 1 && diagonal_here && d[row - col0] <= kNearDuplicate * (norm_row + norm_cols[row - col0])) {
          flagged = 0;
        }
      }
      if (flagged > 0) {
        refine_near_duplicates(d, z_data + row * stride + k * width, norm_row, z_data + col0 * stride + k * width,
                               norm_cols, stride, width, len);
      }
      if (row >= col0 && row < col0 + len) d[row - col0] = 0.0f;
    }
  }

  // kernels()[j] = E_{k,j} of codebook k (after load)
  void codebook_kernels(int64_t k, const BandwidthPlan& plan, int64_t len) {
    bandwidths_chunk(distances(k), plan, kernels(), len);
  }

  // sum_{k in members} d_k (after load): the group's distance, whose kernels are prod_{k in members} E_{k,j}
  const float* group_distances(const std::vector<int>& members, int64_t len) {
    std::copy(distances(members[0]), distances(members[0]) + len, group_dist.begin());
    for (size_t t = 1; t < members.size(); ++t) {
      const float* d = distances(members[t]);
#pragma omp simd
      for (int64_t m = 0; m < len; ++m) group_dist[m] += d[m];
    }
    return group_dist.data();
  }

  // kernels()[j] = prod_{k in members} E_{k,j} = e_j(sum_{k in members} d_k) (after load)
  void group_kernels(const std::vector<int>& members, const BandwidthPlan& plan, int64_t len) {
    bandwidths_chunk(group_distances(members, len), plan, kernels(), len);
  }
};

// Column sums of `count` quantities over one thread's rows of a mirrored tile: float accumulators added into double
// every kColumnFlushRows rows (count 0: a tile without a column side, every call a no-op).
class ColumnSums {
 public:
  ColumnSums(int64_t count, int64_t cols) : cols_(cols), partial_(count * cols, 0.0f), total_(count * cols, 0.0) {}
  void add(int64_t index, int64_t c0, const float* v, int64_t len) {
    if (partial_.empty()) return;
    float* p = partial_.data() + index * cols_ + c0;
#pragma omp simd
    for (int64_t m = 0; m < len; ++m) p[m] += v[m];
  }
  // The partial sums of quantity `index` from column c0 on, for a loop to add into; null without a column side.
  float* partial(int64_t index, int64_t c0) {
    return partial_.empty() ? nullptr : partial_.data() + index * cols_ + c0;
  }
  void end_row() {
    if (++rows_ == kColumnFlushRows) flush();
  }
  // out[index * stride + m] += scale * (the sum of column m of quantity index); out points at the tile's column 0
  void add_to(double* out, int64_t stride, double scale) {
    flush();
    const int64_t count = cols_ > 0 ? static_cast<int64_t>(total_.size()) / cols_ : 0;
    for (int64_t index = 0; index < count; ++index) {
      for (int64_t m = 0; m < cols_; ++m) out[index * stride + m] += scale * total_[index * cols_ + m];
    }
  }

 private:
  void flush() {
    for (size_t idx = 0; idx < partial_.size(); ++idx) {
      total_[idx] += partial_[idx];
      partial_[idx] = 0.0f;
    }
    rows_ = 0;
  }
  int64_t cols_, rows_ = 0;
  std::vector<float> partial_;
  std::vector<double> total_;
};

// z as K unit-stride [N, width] slices, viewed [N, K, width]: the narrow tile products read packed rows.
at::Tensor packed_codebooks(const at::Tensor& z) { return z.transpose(0, 1).contiguous().transpose(0, 1); }

// One pass's tiles and where they run: rounds of tiles on disjoint rows (disjoint_rounds). A round with at least as
// many tiles as threads runs one tile per thread, each on a tile plane of its own with its products and loops
// single-threaded inside (a nested at::parallel_for runs inline there, MKL on one thread): no fork/join per tile, no
// small product split over threads. A smaller round (small N, the tail of a row range) runs tile by tile with the
// threads inside each tile. No locks: every row gets its additions from one tile at a time, in round order.
// MMDKERNELS_DHSIC_SCHEDULE=per-thread|inside forces one way (read at every call); auto (the default): one tile per
// thread when most tiles are in rounds of at least as many tiles as threads.
constexpr const char* kScheduleEnv = "MMDKERNELS_DHSIC_SCHEDULE";

class TileSchedule {
 public:
  // The symmetric tiles owned by the rows [row_begin, row_end) of the plane of N samples, K codebooks.
  TileSchedule(int64_t n, int64_t num_codebooks, const at::TensorOptions& options, int64_t row_begin, int64_t row_end)
      : threads_(at::in_parallel_region() ? 1 : at::get_num_threads()) {
    planes_.reserve(threads_);
    planes_.emplace_back(n, num_codebooks, options, kDhsicTileBudgetFloats);
    tiles_ = planes_.front().symmetric_tiles(row_begin, row_end);
    rounds_ = disjoint_rounds(tiles_, planes_.front().row_block());
    int64_t spread = 0;
    for (const auto& round : rounds_) {
      const int64_t size = static_cast<int64_t>(round.size());
      spread += size >= threads_ ? size : 0;
    }
    const char* env = std::getenv(kScheduleEnv);
    const std::string mode = env == nullptr || *env == '\0' ? "auto" : env;
    TORCH_CHECK(mode == "auto" || mode == "per-thread" || mode == "inside", kScheduleEnv,
                " must be one of auto, per-thread, inside; got '", mode, "'");
    const bool mostly_spread = 2 * spread > static_cast<int64_t>(tiles_.size());
    per_thread_ = threads_ > 1 && (mode == "per-thread" || (mode == "auto" && mostly_spread));
    if (per_thread_) {
      for (int64_t t = 1; t < threads_; ++t) planes_.emplace_back(n, num_codebooks, options, kDhsicTileBudgetFloats);
    }
  }
  const std::vector<Tile>& tiles() const { return tiles_; }
  // whether most tiles run one per thread (the GEMM/fused choice is measured that way then)
  bool per_thread() const { return per_thread_; }
  int64_t threads() const { return threads_; }
  const TilePlane& plane(int64_t t) const { return planes_[t]; }
  // fn(tile, plane) for every tile
  template <class F>
  void run(const F& fn) const {
    for (const auto& round : rounds_) {
      const int64_t size = static_cast<int64_t>(round.size());
      if (!per_thread_ || size < threads_) {
        for (const Tile& tile : round) fn(tile, planes_.front());
        continue;
      }
      at::parallel_for(0, threads_, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          for (int64_t i = t; i < size; i += threads_) fn(round[i], planes_[t]);
        }
      });
    }
  }

 private:
  std::vector<Tile> tiles_;
  int64_t threads_;
  std::vector<TilePlane> planes_;
  std::vector<std::vector<Tile>> rounds_;
  bool per_thread_ = false;
};

// Which kernel fills a pass's distance tiles: MMDKERNELS_MMD_TILE=gemm|fused forces one (read at every call, so tests
// can switch); auto (the default) measures both on the first tile of the first call of a shape class (tile rows and
// columns bucketed to powers of two, K, D, threads, schedule) and keeps the faster for the process, as the RVQ encoder
// and the GEMM choice do (MMDKERNELS_GEMM_VERBOSE=1 prints the measurement). "gemm": K products per tile (tile_product:
// MKL or oneDNN), converted to distances by the passes; "fused": gram_fused.h on columns packed once per pass.
enum class GramKernel { kGemm, kFused };
constexpr const char* kTileEnv = "MMDKERNELS_MMD_TILE";

// The measured choices of the process, by shape class (tile rows and columns bucketed, K, D, threads, one tile per
// thread): what mmd_dhsic_tile_choices reports.
using GramKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int, bool>;
struct GramChoice {
  GramKernel kernel;
  double gemm_s, fused_s;
};
std::mutex g_gram_mutex;
std::map<GramKey, GramChoice> g_gram_choices;

std::string gram_choices_json() {
  const std::lock_guard<std::mutex> lock(g_gram_mutex);
  std::ostringstream json;
  json << "[";
  const char* separator = "";
  for (const auto& [key, c] : g_gram_choices) {
    const auto& [rows, cols, codebooks, width, threads, per_thread] = key;
    json << separator << "{\"rows\": " << rows << ", \"cols\": " << cols << ", \"codebooks\": " << codebooks
         << ", \"width\": " << width << ", \"threads\": " << threads << ", \"schedule\": \""
         << (per_thread ? "per-thread" : "inside") << "\", \"chosen\": \""
         << (c.kernel == GramKernel::kFused ? "fused" : "gemm") << "\", \"seconds\": {\"gemm\": " << c.gemm_s
         << ", \"fused\": " << c.fused_s << "}}";
    separator = ", ";
  }
  json << "]";
  return json.str();
}

// The K distance tiles of one pass over `tiles` of the plane: dot products by GEMM, or distances by the micro-kernel.
class GramTiles {
 public:
  GramTiles(const at::Tensor& packed, const at::Tensor& norms, const SliceLayout& layout, const TileSchedule& schedule)
      : packed_(packed), norms_(norms), layout_(layout), schedule_(schedule) {
    const std::vector<Tile>& tiles = schedule.tiles();
    const char* env = std::getenv(kTileEnv);
    const std::string mode = env == nullptr || *env == '\0' ? "auto" : env;
    TORCH_CHECK(mode == "auto" || mode == "gemm" || mode == "fused", kTileEnv,
                " must be one of auto, gemm, fused; got '", mode, "'");
    if (mode == "fused") kernel_ = GramKernel::kFused;
    if (mode != "auto") print_forced(mode);
    if (mode == "auto" && !tiles.empty()) kernel_ = measured_choice(tiles);
    if (kernel_ == GramKernel::kGemm) columns_ = gram::PackedColumns();
    if (kernel_ == GramKernel::kFused && columns_.panels.empty()) pack();
  }

  // The plane's slices for `tile`: dot products (gemm) or distances (fused, see distances()).
  void fill(const Tile& tile, const TilePlane& plane) const {
    if (kernel_ == GramKernel::kGemm) return dot_tiles(packed_, packed_, layout_, tile, plane);
    const int64_t n = packed_.size(0), dim = layout_.width;
    const float* z = packed_.data_ptr<float>();  // [K][N][D] storage
    const float* norms = norms_.data_ptr<float>();
    const int64_t blocks = (tile.rows + gram::kBlockRows - 1) / gram::kBlockRows;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const int64_t i0 = begin * gram::kBlockRows, i1 = std::min(tile.rows, end * gram::kBlockRows);
      std::vector<float> transposed;
      for (int64_t k = 0; k < layout_.num_slices; ++k) {
        gram::distance_block(z + k * n * dim, norms + k * n, columns_, k, tile.row0 + i0, tile.row0 + i1, tile.col0,
                             tile.cols, plane.row(k, tile, i0), tile.cols, transposed);
      }
    });
  }
  bool distances() const { return kernel_ == GramKernel::kFused; }

 private:
  void pack() {
    columns_ = gram::pack_columns(packed_.data_ptr<float>(), norms_.data_ptr<float>(), packed_.size(0),
                                  layout_.num_slices, layout_.width, [](int64_t begin, int64_t end, auto&& fn) {
                                    at::parallel_for(begin, end, 1, fn);
                                  });
  }

  // With MMDKERNELS_GEMM_VERBOSE=1, says once per process and kernel that it was forced.
  static void print_forced(const std::string& mode) {
    static std::once_flag printed[2];
    const char* verbose = std::getenv("MMDKERNELS_GEMM_VERBOSE");
    if (verbose == nullptr || std::string(verbose) != "1") return;
    std::call_once(printed[mode == "fused" ? 1 : 0],
                   [&] { std::fprintf(stderr, "mmdkernels dhsic tile: -> %s (%s)\n", mode.c_str(), kTileEnv); });
  }

  // Seconds of fill_with(plane) as the pass runs it: one tile with the threads inside it, or (per thread) every
  // thread filling a tile on its own plane at once (the slowest thread's time).
  template <class F>
  double timed(const F& fill_with) const {
    const int64_t workers = schedule_.per_thread() ? schedule_.threads() : 1;
    return slowest_worker_seconds(workers, [&](int64_t t) { fill_with(schedule_.plane(t)); });
  }

  // Times the first tile both ways, alternating rounds; the fused kernel is charged its share of the packing (the
  // tile's entries over the pass's, about half the rows' plane).
  GramKernel measured_choice(const std::vector<Tile>& tiles) {
    const Tile& tile = tiles.front();
    const int64_t n = packed_.size(0);
    const GramKey key{pow2_bucket(tile.rows), pow2_bucket(tile.cols), layout_.num_slices, layout_.width,
                      static_cast<int>(schedule_.threads()), schedule_.per_thread()};
    const std::lock_guard<std::mutex> lock(g_gram_mutex);
    const auto it = g_gram_choices.find(key);
    if (it != g_gram_choices.end()) return it->second.kernel;
    const double pack_s = best_seconds(1, [&] { pack(); });
    double gemm_s = std::numeric_limits<double>::infinity(), fused_s = gemm_s;
    kernel_ = GramKernel::kFused;
    for (int round = 0; round < 3; ++round) {
      fused_s = std::min(fused_s, timed([&](const TilePlane& plane) { fill(tile, plane); }));
      gemm_s = std::min(gemm_s, timed([&](const TilePlane& plane) {
                          dot_tiles(packed_, packed_, layout_, tile, plane);
                        }));
    }
    int64_t entries = 0;
    for (const Tile& t : tiles) entries += t.rows * t.cols;
    fused_s += pack_s * static_cast<double>(tile.rows * tile.cols) / static_cast<double>(std::max<int64_t>(entries, 1));
    const GramKernel kernel = fused_s < gemm_s ? GramKernel::kFused : GramKernel::kGemm;
    const char* verbose = std::getenv("MMDKERNELS_GEMM_VERBOSE");
    if (verbose != nullptr && std::string(verbose) == "1") {
      std::fprintf(stderr,
                   "mmdkernels dhsic tile: %lld x %lld x %lld, K %lld, N %lld, %s: gemm %.3g s, fused %.3g s -> %s\n",
                   static_cast<long long>(tile.rows), static_cast<long long>(tile.cols),
                   static_cast<long long>(layout_.width), static_cast<long long>(layout_.num_slices),
                   static_cast<long long>(n), schedule_.per_thread() ? "a tile per thread" : "threads in a tile",
                   gemm_s, fused_s, kernel == GramKernel::kFused ? "fused" : "gemm");
    }
    g_gram_choices.emplace(key, GramChoice{kernel, gemm_s, fused_s});
    return kernel;
  }

  const at::Tensor& packed_;
  const at::Tensor& norms_;
  const SliceLayout& layout_;
  const TileSchedule& schedule_;
  GramKernel kernel_ = GramKernel::kGemm;
  gram::PackedColumns columns_;
};

// Pass 1 over the pairs owned by the rows [row_begin, row_end) (TilePlane::symmetric_tiles: every E_{k,j} is
// symmetric): float64 [K*A + 1, N], row k*A + j = sum_m E_{k,j}(n, m) over those pairs, added to the row n and, for a
// mirrored tile, to the column m too; the last row's total = sum over groups, bandwidths and those pairs (mirrored
// ones twice) of the joint Gram. Summed over a partition of the rows into ranges: the full sums.
at::Tensor dhsic_sums(const at::Tensor& z, const SliceLayout& layout, const BandwidthPlan& plan, int64_t row_begin,
                      int64_t row_end) {
  const int64_t n = z.size(0), num_codebooks = z.size(1);
  const int num_bw = plan.count;
  const int64_t num_kj = num_codebooks * num_bw;
  const auto norms = slice_norms(z, layout);
  const float* norm_data = norms.data_ptr<float>();
  const auto packed = packed_codebooks(z);
  auto sums = at::zeros({num_kj + 1, n}, z.options().dtype(at::kDouble));
  double* row_sums = sums.data_ptr<double>();
  double* joint_row_sums = row_sums + num_kj * n;
  std::mutex column_mutex;
  const bool fixed_chain = use_fixed_chain(plan);
  const TileSchedule schedule(n, num_codebooks, z.options(), row_begin, row_end);
  const GramTiles gram(packed, norms, layout, schedule);
  schedule.run([&](const Tile& tile, const TilePlane& plane) {
    gram.fill(tile, plane);
    const double multiplicity = tile.mirrored ? 2.0 : 1.0;
    at::parallel_for(0, tile.rows, 1, [&](int64_t begin, int64_t end) {
      const FlushDenormals flush_denormals;
      DhsicScratch scratch(num_codebooks);
      ColumnSums columns(tile.mirrored ? num_kj : 0, tile.cols);
      auto* e = scratch.kernels();
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = tile.row0 + i;
        double joint_sum = 0.0;
        for (int64_t c0 = 0; c0 < tile.cols; c0 += kChunk) {
          const int64_t len = std::min(kChunk, tile.cols - c0);
          scratch.load(plane, tile, gram.distances(), z, norm_data, n, i, c0, len);
          for (int64_t k = 0; k < num_codebooks; ++k) {
            if (fixed_chain) {
              float sums[DefaultChain::kCount];
              float* cols[DefaultChain::kCount];
              for (int j = 0; j < num_bw; ++j) cols[j] = columns.partial(k * num_bw + j, c0);
              if (tile.mirrored) {
                ChainLoops<DefaultChain>::row_sums<true>(scratch.distances(k), plan.base_coef, cols, sums, len);
              } else {
                ChainLoops<DefaultChain>::row_sums<false>(scratch.distances(k), plan.base_coef, cols, sums, len);
              }
              for (int j = 0; j < num_bw; ++j) row_sums[(k * num_bw + j) * n + row] += sums[j];
              continue;
            }
            scratch.codebook_kernels(k, plan, len);
            for (int j = 0; j < num_bw; ++j) {
              row_sums[(k * num_bw + j) * n + row] += sum_chunk_float(e[j], len);
              columns.add(k * num_bw + j, c0, e[j], len);
            }
          }
          for (const auto& members : layout.group_members) {
            if (fixed_chain) {
              float sums[DefaultChain::kCount];
              ChainLoops<DefaultChain>::row_sums<false>(scratch.group_distances(members, len), plan.base_coef,
                                                        nullptr, sums, len);
              joint_sum += ((sums[0] + sums[1]) + (sums[2] + sums[3])) + (sums[4] + sums[5]);
              continue;
            }
            scratch.group_kernels(members, plan, len);
            for (int j = 0; j < num_bw; ++j) joint_sum += sum_chunk_float(e[j], len);
          }
        }
        joint_row_sums[row] += multiplicity * joint_sum;
        columns.end_row();
      }
      if (tile.mirrored) {
        const std::lock_guard<std::mutex> lock(column_mutex);
        columns.add_to(row_sums + tile.col0, n, 1.0);
      }
    });
  });
  return sums;
}

// The loss from the sums of ALL rows, and (compute_grad) pass 2 over the pairs owned by the rows [row_begin, row_end)
// (as in pass 1): their gradient. The weights W_k are symmetrised, so a diagonal tile's row side is its whole
// gradient and a mirrored tile's gradient is its row side plus its column side.
std::tuple<at::Tensor, at::Tensor> dhsic_loss_and_rows_grad(const at::Tensor& z, const at::Tensor& groups,
                                                            const SliceLayout& layout, const BandwidthPlan& plan,
                                                            const at::Tensor& sums, int64_t row_begin,
                                                            int64_t row_end, bool compute_grad) {
  const int64_t n = z.size(0), num_codebooks = z.size(1);
  const int num_bw = plan.count;
  const DhsicStats stats = dhsic_statistics(sums, groups, num_bw, compute_grad);
  if (!compute_grad) return {stats.loss, at::empty({0}, z.options())};
  // groups of one codebook (joint mode with K = 1) are independent of nothing: dHSIC is 0 and so is its gradient,
  // exactly (the regrouped weights below cancel only to rounding)
  const bool trivial = std::all_of(layout.group_members.begin(), layout.group_members.end(),
                                   [](const auto& members) { return members.size() <= 1; });
  if (trivial) return {stats.loss, at::zeros_like(z)};
  // sum_j dhsic_entry_weight regrouped:
  // W_k(n, m) = -(2/N^2) sum_j c_j J_{k,j} - sum_j E_{k,j} (a_{k,j}(n) - b_{k,j}(m))
  // with b_{k,j} = c_j beta_{k,j} and a_{k,j}(n) = 2 c_j gamma_{k,j} - b_{k,j}(n) (gamma, beta: docs/mmd_kernels.md);
  // sum_j c_j J_{k,j} = sum_{g contains k} sum_j c_j e_j(D_g), one chain per group, not one per codebook.
  const float* gamma = stats.gamma.data_ptr<float>();
  auto scaled_beta = stats.beta.clone();  // b: float32 [K, A, N]
  for (int j = 0; j < num_bw; ++j) scaled_beta.select(1, j).mul_(plan.coef[j]);
  const float* b = scaled_beta.data_ptr<float>();
  const float two_inv_n2 = static_cast<float>(2.0 / (static_cast<double>(n) * static_cast<double>(n)));

  const auto norms = slice_norms(z, layout);
  const float* norm_data = norms.data_ptr<float>();
  const auto packed = packed_codebooks(z);
  auto grad = at::zeros_like(z);
  GradientSide side(packed, layout, grad, at::Tensor());
  double* weight_sums = side.weight_sums();  // [K, N]
  std::mutex column_mutex;
  const bool fixed_chain = use_fixed_chain(plan);
  // joint mode: one group of every codebook, whose slope is every codebook's (no per-codebook copies)
  const bool one_group = layout.group_members.size() == 1 &&
                         static_cast<int64_t>(layout.group_members.front().size()) == num_codebooks;
  // slope[m] = sum_j coef_j e_j(group distance) by the plan's chunk loops
  const auto group_plan_slope = [&](DhsicScratch& scratch, const std::vector<int>& members, float* slope,
                                    int64_t len) {
    auto* e = scratch.kernels();
    scratch.group_kernels(members, plan, len);
    std::fill(slope, slope + len, 0.0f);
    for (int j = 0; j < num_bw; ++j) {
      const float coef = plan.coef[j];
#pragma omp simd
      for (int64_t m = 0; m < len; ++m) slope[m] += coef * e[j][m];
    }
  };
  const TileSchedule schedule(n, num_codebooks, z.options(), row_begin, row_end);
  const GramTiles gram(packed, norms, layout, schedule);
  schedule.run([&](const Tile& tile, const TilePlane& plane) {
    gram.fill(tile, plane);
    at::parallel_for(0, tile.rows, 1, [&](int64_t begin, int64_t end) {
      const FlushDenormals flush_denormals;
      DhsicScratch scratch(num_codebooks);
      ColumnSums columns(tile.mirrored ? num_codebooks : 0, tile.cols);
      auto* e = scratch.kernels();
      std::vector<float> joint_slope(num_codebooks * kChunk);  // sum_j c_j J_{k,j}, [K][kChunk]
      std::vector<float> group_slope(kChunk);
      std::vector<double> row_weight_sums(num_codebooks);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = tile.row0 + i;
        std::fill(row_weight_sums.begin(), row_weight_sums.end(), 0.0);
        for (int64_t c0 = 0; c0 < tile.cols; c0 += kChunk) {
          const int64_t len = std::min(kChunk, tile.cols - c0);
          const int64_t col0 = tile.col0 + c0;
          scratch.load(plane, tile, gram.distances(), z, norm_data, n, i, c0, len);
          if (!one_group) std::fill(joint_slope.begin(), joint_slope.end(), 0.0f);
          for (const auto& members : layout.group_members) {
            if (fixed_chain) {
              ChainLoops<DefaultChain>::slope<false>(scratch.group_distances(members, len), plan.base_coef,
                                                     plan.coef, group_slope.data(), nullptr, len);
            } else {
              group_plan_slope(scratch, members, group_slope.data(), len);
            }
            if (one_group) continue;
            for (int k : members) {
              float* slope = joint_slope.data() + k * kChunk;
#pragma omp simd
              for (int64_t m = 0; m < len; ++m) slope[m] += group_slope[m];
            }
          }
          for (int64_t k = 0; k < num_codebooks; ++k) {
            float* weights = plane.row(k, tile, i) + c0;  // the dots of this chunk are in dist now
            const float* slope = one_group ? group_slope.data() : joint_slope.data() + k * kChunk;
            if (fixed_chain) {
              float a_k[DefaultChain::kCount];
              const float* b_k[DefaultChain::kCount];
              for (int j = 0; j < num_bw; ++j) {
                const float* b_kj = b + (k * num_bw + j) * n;
                a_k[j] = 2.0f * plan.coef[j] * gamma[k * num_bw + j] - b_kj[row];
                b_k[j] = b_kj + col0;
              }
              float* cols = columns.partial(k, c0);
              row_weight_sums[k] +=
                  cols == nullptr
                      ? ChainLoops<DefaultChain>::weights<false>(scratch.distances(k), plan.base_coef, -two_inv_n2,
                                                                 slope, a_k, b_k, weights, cols, len)
                      : ChainLoops<DefaultChain>::weights<true>(scratch.distances(k), plan.base_coef, -two_inv_n2,
                                                                slope, a_k, b_k, weights, cols, len);
              continue;
            }
            scratch.codebook_kernels(k, plan, len);
#pragma omp simd
            for (int64_t m = 0; m < len; ++m) weights[m] = -two_inv_n2 * slope[m];
            for (int j = 0; j < num_bw; ++j) {
              const float* b_kj = b + (k * num_bw + j) * n;
              const float a_kj = 2.0f * plan.coef[j] * gamma[k * num_bw + j] - b_kj[row];
              const float* b_cols = b_kj + col0;
#pragma omp simd
              for (int64_t m = 0; m < len; ++m) weights[m] -= e[j][m] * (a_kj - b_cols[m]);
            }
            const float* d = scratch.distances(k);
#pragma omp simd
            for (int64_t m = 0; m < len; ++m) weights[m] = d[m] == 0.0f ? 0.0f : weights[m];  // duplicates: a - b = 0
            row_weight_sums[k] += sum_chunk_float(weights, len);
            columns.add(k, c0, weights, len);
          }
        }
        for (int64_t k = 0; k < num_codebooks; ++k) weight_sums[k * n + row] += 2.0 * row_weight_sums[k];
        columns.end_row();
      }
      if (tile.mirrored) {
        const std::lock_guard<std::mutex> lock(column_mutex);
        columns.add_to(weight_sums + tile.col0, n, 2.0);
      }
    });
    side.add_rows(plane, tile, packed, 2.0, /*sum_weights=*/false);
    if (tile.mirrored) side.add_columns(plane, tile, packed, 2.0, /*sum_weights=*/false);
  });
  side.finish();
  return {stats.loss, grad};
}

// The checked arguments and the slice layout (one slice per codebook) of the rows [row_begin, row_end).
struct DhsicSetup {
  BandwidthPlan plan;
  SliceLayout layout;
  int64_t row_end;
};

DhsicSetup dhsic_setup(const at::Tensor& z, const at::Tensor& groups, c10::ArrayRef<double> coefs,
                       c10::ArrayRef<int64_t> chain_src, c10::ArrayRef<int64_t> chain_step, double chain_base,
                       int64_t row_begin, int64_t row_end) {
  const auto checked =
      check_dhsic_args(c10::DeviceType::CPU, z, groups, coefs, chain_src, chain_step, chain_base, row_begin, row_end);
  return {checked.plan, make_layout(groups, z.size(1), z.size(2), /*allow_joint_slice=*/false), checked.row_end};
}

std::tuple<at::Tensor, at::Tensor> mmd_dhsic_cpu(const at::Tensor& z, const at::Tensor& groups,
                                                 c10::ArrayRef<double> coefs, c10::ArrayRef<int64_t> chain_src,
                                                 c10::ArrayRef<int64_t> chain_step, double chain_base,
                                                 bool compute_grad) {
  const auto setup = dhsic_setup(z, groups, coefs, chain_src, chain_step, chain_base, 0, -1);
  const auto sums = dhsic_sums(z, setup.layout, setup.plan, 0, setup.row_end);
  return dhsic_loss_and_rows_grad(z, groups, setup.layout, setup.plan, sums, 0, setup.row_end, compute_grad);
}

at::Tensor mmd_dhsic_sums_cpu(const at::Tensor& z, const at::Tensor& groups, c10::ArrayRef<double> coefs,
                              c10::ArrayRef<int64_t> chain_src, c10::ArrayRef<int64_t> chain_step, double chain_base,
                              int64_t row_begin, int64_t row_end) {
  const auto setup = dhsic_setup(z, groups, coefs, chain_src, chain_step, chain_base, row_begin, row_end);
  return dhsic_sums(z, setup.layout, setup.plan, row_begin, setup.row_end);
}

std::tuple<at::Tensor, at::Tensor> mmd_dhsic_rows_cpu(const at::Tensor& z, const at::Tensor& groups,
                                                      c10::ArrayRef<double> coefs, c10::ArrayRef<int64_t> chain_src,
                                                      c10::ArrayRef<int64_t> chain_step, double chain_base,
                                                      const at::Tensor& sums, int64_t row_begin, int64_t row_end,
                                                      bool compute_grad) {
  const auto setup = dhsic_setup(z, groups, coefs, chain_src, chain_step, chain_base, row_begin, row_end);
  check_dhsic_sums(sums, z, setup.plan);
  return dhsic_loss_and_rows_grad(z, groups, setup.layout, setup.plan, sums.contiguous(), row_begin, setup.row_end,
                                  compute_grad);
}

}  // namespace
}  // namespace mmd
}  // namespace mmdkernels

// No tensor arguments: dispatched through CompositeExplicitAutograd.
TORCH_LIBRARY_IMPL(mmdkernels, CompositeExplicitAutograd, m) {
  m.impl("mmd_dhsic_tile_choices", &mmdkernels::mmd::gram_choices_json);
}

TORCH_LIBRARY_IMPL(mmdkernels, CPU, m) {
  m.impl("mmd_dhsic", &mmdkernels::mmd::mmd_dhsic_cpu);
  m.impl("mmd_dhsic_sums", &mmdkernels::mmd::mmd_dhsic_sums_cpu);
  m.impl("mmd_dhsic_rows", &mmdkernels::mmd::mmd_dhsic_rows_cpu);
}
