// Scalar arithmetic of the fused RVQ encode/decode, shared by the C++ CPU kernel (rvq_cpu.cpp) and the CUDA kernel
// (rvq_cuda.cu) so that both score entries and break ties identically: the score |c|^2 - 2 r.c, the (score, index)
// order that picks the lowest index among equal scores, and the flat offsets into codebooks / codes / quantized.
// Plain C++ (no CUDA headers); every function is __host__ __device__ under nvcc. All arithmetic is float32.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RVQ_HD __host__ __device__ __forceinline__
#else
#define RVQ_HD inline
#endif

namespace mmdkernels {
namespace rvq {

// A candidate codebook entry of one row: its score and its index in the codebook.
struct ScoredIndex {
  float score;
  int64_t index;
};

// |r - c|^2 - |r|^2 = |c|^2 - 2 r.c, the quantity every backend minimises (|r|^2 is the same for every entry).
RVQ_HD float entry_score(float sqnorm, float dot) { return sqnorm - 2.0f * dot; }

// Loses to every real candidate: its index is past any codebook, so even an entry scoring +inf beats it.
// Only an all-NaN row keeps it; callers map that to entry 0 (what torch.argmin returns for such a row).
RVQ_HD ScoredIndex no_candidate() { return {INFINITY, INT64_MAX}; }

// The better of two candidates: the lower score, ties to the lower index. A strict total order on candidates with
// distinct indices (NaN scores never win), so merging partial results in any order or tree shape gives the same
// answer as one left-to-right scan, i.e. the first minimum, like torch.argmin.
RVQ_HD ScoredIndex better_of(const ScoredIndex& a, const ScoredIndex& b) {
  if (b.score < a.score || (b.score == a.score && b.index < a.index)) return b;
  return a;
}

// Offset of codebooks[k, code, 0] in a contiguous [K, C, D] tensor.
RVQ_HD int64_t entry_offset(int64_t k, int64_t code, int64_t num_entries, int64_t dim) {
  return (k * num_entries + code) * dim;
}

// Offset of quantized[row, k, 0] in a contiguous [N, K, D] tensor (codes[row, k] is at row * K + k).
RVQ_HD int64_t quantized_offset(int64_t row, int64_t k, int64_t num_codebooks, int64_t dim) {
  return (row * num_codebooks + k) * dim;
}

}  // namespace rvq
}  // namespace mmdkernels
