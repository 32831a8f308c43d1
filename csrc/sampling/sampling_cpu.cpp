// Fused multi-codebook sampling on the CPU: at::parallel_for over the B*K rows, each row sampled by one thread from
// its own scratch buffers (a few V-sized arrays, in L1/L2). No full sort: top-k finds its k-th largest z by
// bisection on order keys (kth_largest_key; ties at it go to the lowest indices); top-p sorts the surviving
// candidates in growing chunks (nth_element, then sort of the next chunk) only until the mass ranked before reaches
// p * S; exps are computed only for the candidates. Logits are float32/bfloat16/float16, computed in float32; masses
// are summed in float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "common/checks.h"
#include "sampling/sampling_checks.h"
#include "sampling/sampling_tile.h"

namespace mmdkernels {
namespace sampling {
namespace {

struct SampleParams {
  float inv_temperature;
  bool greedy;
  int64_t top_k;
  double top_p;
  float cfg_coef;
  bool use_cfg;
};

// Per-thread buffers, sized for one row.
struct RowScratch {
  std::vector<float> z;             // scaled logits [V]
  std::vector<uint32_t> order;      // order keys of z (top-k)
  std::vector<uint64_t> keys;       // rank keys of the top-p candidates
  std::vector<int32_t> cand_index;  // candidates in vocabulary order
  std::vector<float> cand_z;
  std::vector<float> cand_e;
  explicit RowScratch(int64_t num_tokens)
      : z(num_tokens),
        order(num_tokens),
        keys(num_tokens),
        cand_index(num_tokens),
        cand_z(num_tokens),
        cand_e(num_tokens) {}
};

// The order key of the k-th largest of z[0..n) (1 <= k <= n, no NaN; keys[i] = order_key(z[i]) on return): the largest
// key t with #{keys >= t} >= k, set bit by bit from the top (the count falls as t grows): 32 counting passes that
// vectorise, where nth_element's data-dependent branches had taken 45 % of a 16-row, V = 2048, top-k 250 call (perf,
// session 13). Exact: the same k-th value, so the same candidates and tokens.
uint32_t kth_largest_key(const float* z, int64_t n, int64_t k, uint32_t* keys) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) keys[i] = order_key(z[i]);
  uint32_t t = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t candidate = t | (uint32_t{1} << bit);
    int64_t count = 0;
#pragma omp simd reduction(+ : count)
    for (int64_t i = 0; i < n; ++i) count += keys[i] >= candidate ? 1 : 0;
    if (count >= k) t = candidate;
  }
  return t;
}

// Boundary rank key of top-p among the candidates (which are in vocabulary order): chunks of the candidates are
// selected and sorted by rank until the float64 mass ranked before the next one reaches p * S. 0 keeps all.
uint64_t top_p_boundary(RowScratch& s, int64_t num_candidates, double top_p) {
  double total = 0.0;
  for (int64_t c = 0; c < num_candidates; ++c) total += s.cand_e[c];
  const double target = top_p * total;
  // Key with the candidate's position in place of its index: the same order (positions follow indices).
  uint64_t* keys = s.keys.data();
  for (int64_t c = 0; c < num_candidates; ++c) keys[c] = rank_key(s.cand_z[c], c, num_candidates);
  double before = 0.0;
  int64_t sorted_end = 0, chunk = 64;
  while (sorted_end < num_candidates) {
    const int64_t next = std::min(num_candidates, sorted_end + chunk);
    chunk *= 2;
    if (next < num_candidates) {
      std::nth_element(keys + sorted_end, keys + next - 1, keys + num_candidates, std::greater<uint64_t>());
    }
    std::sort(keys + sorted_end, keys + next, std::greater<uint64_t>());
    for (int64_t r = sorted_end; r < next; ++r) {
      if (before >= target) return keys[r - 1];  // r >= 1: before is 0 < target at rank 0
      before += s.cand_e[index_of_key(keys[r], num_candidates)];
    }
    sorted_end = next;
  }
  return 0;
}

// The inverse-CDF draw over the kept candidates in vocabulary order (see reference.py, step 5).
int64_t draw(const RowScratch& s, int64_t num_candidates, uint64_t boundary, double u) {
  double total = 0.0;
  for (int64_t c = 0; c < num_candidates; ++c) {
    if (rank_key(s.cand_z[c], c, num_candidates) >= boundary) total += s.cand_e[c];
  }
  const double threshold = u * total;
  double through = 0.0;
  int64_t last_drawable = -1;
  for (int64_t c = 0; c < num_candidates; ++c) {
    if (s.cand_e[c] <= 0.0f || rank_key(s.cand_z[c], c, num_candidates) < boundary) continue;
    through += s.cand_e[c];
    if (through > threshold) return s.cand_index[c];
    last_drawable = s.cand_index[c];
  }
  return last_drawable;
}

// z (x itself when greedy) of one row into `z`: a vectorisable loop, the CFG and greedy branches hoisted.
template <bool kUseCfg, bool kGreedy, typename scalar_t>
void scaled_logits(const scalar_t* cond, const scalar_t* uncond, int64_t num_tokens, const SampleParams& p, float* z) {
#pragma omp simd
  for (int64_t i = 0; i < num_tokens; ++i) {
    const float x = mixed_logit(static_cast<float>(cond[i]), kUseCfg ? static_cast<float>(uncond[i]) : 0.0f,
                                p.cfg_coef, kUseCfg);
    z[i] = kGreedy ? x : scaled_logit(x, p.inv_temperature);
  }
}

template <typename scalar_t>
int64_t sample_row(const scalar_t* cond, const scalar_t* uncond, int64_t num_tokens, const SampleParams& p, double u,
                   RowScratch& s) {
  float* z = s.z.data();
  if (p.use_cfg) {
    p.greedy ? scaled_logits<true, true>(cond, uncond, num_tokens, p, z)
             : scaled_logits<true, false>(cond, uncond, num_tokens, p, z);
  } else {
    p.greedy ? scaled_logits<false, true>(cond, uncond, num_tokens, p, z)
             : scaled_logits<false, false>(cond, uncond, num_tokens, p, z);
  }
  float top = -INFINITY;
  int bad = 0;
#pragma omp simd reduction(max : top) reduction(| : bad)
  for (int64_t i = 0; i < num_tokens; ++i) {
    top = z[i] > top ? z[i] : top;
    bad |= is_bad_logit(z[i]);
  }
  if (bad || top == -INFINITY) return kInvalidToken;
  if (p.greedy) return std::find(z, z + num_tokens, top) - z;  // the first maximum

  int64_t num_candidates = 0;
  if (top_k_active(p.top_k, num_tokens)) {
    // The k-th largest z, then the k tokens ranked first: every z above it and the lowest-index ties at it (in order
    // keys, which rank as the floats do: z has no -0, scaled_logit).
    const uint32_t* keys = s.order.data();
    const uint32_t kth = kth_largest_key(z, num_tokens, p.top_k, s.order.data());
    int64_t above = 0;
#pragma omp simd reduction(+ : above)
    for (int64_t i = 0; i < num_tokens; ++i) above += keys[i] > kth ? 1 : 0;
    int64_t ties_left = p.top_k - above;
    for (int64_t i = 0; i < num_tokens; ++i) {
      if (keys[i] > kth || (keys[i] == kth && ties_left-- > 0)) {
        s.cand_index[num_candidates++] = static_cast<int32_t>(i);
      }
    }
    for (int64_t c = 0; c < num_candidates; ++c) s.cand_z[c] = z[s.cand_index[c]];
  } else {
    for (int64_t i = 0; i < num_tokens; ++i) s.cand_index[i] = static_cast<int32_t>(i);
    std::copy(z, z + num_tokens, s.cand_z.begin());
    num_candidates = num_tokens;
  }
  for (int64_t c = 0; c < num_candidates; ++c) s.cand_e[c] = std::exp(s.cand_z[c] - top);
  const uint64_t boundary = p.top_p < 1.0 ? top_p_boundary(s, num_candidates, p.top_p) : 0;
  return draw(s, num_candidates, boundary, u);
}

at::Tensor sample_tokens_cpu(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k,
                             double top_p, double cfg_coef, bool use_cfg) {
  MMD_CHECK_DEVICE(logits, at::Device(at::kCPU));
  const int64_t rows = check_sample_tokens_args(logits, uniforms, temperature, top_k, top_p, use_cfg);
  const int64_t num_codebooks = logits.size(1), num_tokens = logits.size(2);
  const SampleParams params{temperature > 0.0 ? inverse_temperature(temperature) : 0.0f,
                            temperature == 0.0,
                            top_k,
                            top_p,
                            static_cast<float>(cfg_coef),
                            use_cfg};
  auto tokens = at::empty({rows, num_codebooks}, logits.options().dtype(at::kLong));
  int64_t* token_data = tokens.data_ptr<int64_t>();
  const double* u = uniforms.data_ptr<double>();
  const int64_t uncond_offset = rows * num_codebooks * num_tokens;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sample_tokens_cpu", [&] {
    const scalar_t* data = logits.data_ptr<scalar_t>();
    at::parallel_for(0, rows * num_codebooks, 1, [&](int64_t begin, int64_t end) {
      RowScratch scratch(num_tokens);
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* cond = data + row * num_tokens;
        token_data[row] = sample_row(cond, cond + uncond_offset, num_tokens, params, u[row], scratch);
      }
    });
  });
  return tokens;
}

}  // namespace
}  // namespace sampling
}  // namespace mmdkernels

TORCH_LIBRARY_IMPL(mmdkernels, CPU, m) { m.impl("sample_tokens", &mmdkernels::sampling::sample_tokens_cpu); }
