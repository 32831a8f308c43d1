// Fused residual VQ on the CPU: all K stages of nearest-neighbour encoding in one pass over blocks of rows, and the
// decode gather-sum. Blocks of kRowsPerBlock frames keep their residuals in cache through all K stages; per stage,
// the score tile (rows x a chunk of entries) comes from one BLAS GEMM (all threads), a vectorised per-row scan
// (at::parallel_for) turns it into a running (min score, lowest index), and the chosen entries are subtracted from
// the residuals before the next stage. Nothing of size N x C is ever allocated. float32 throughout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "rvq/rvq_tile.h"

namespace mmdkernels {
namespace rvq {
namespace {

constexpr int64_t kRowsPerBlock = 256;
constexpr int64_t kEntriesPerChunk = 2048;  // score tile: 256 x 2048 floats = 2 MiB

// Lowest index of the minimum of score[c] = sqnorms[c] - 2 dots[c] over c in [0, len), as (score, offset + index).
// The scores overwrite the dots first, so the min and the search for it compare the very same stored floats.
ScoredIndex best_in_chunk(const float* sqnorms, float* dots, int64_t len, int64_t offset) {
  float lowest = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(min : lowest)
  for (int64_t c = 0; c < len; ++c) {
    dots[c] = entry_score(sqnorms[c], dots[c]);
    lowest = std::min(lowest, dots[c]);
  }
  int64_t c = 0;
  while (c + 1 < len && dots[c] != lowest) ++c;
  return {lowest, offset + c};
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

std::tuple<at::Tensor, at::Tensor> rvq_encode_cpu(const at::Tensor& x, const at::Tensor& codebooks,
                                                  const at::Tensor& sqnorms, bool return_quantized) {
  check_encode_inputs(x, codebooks, sqnorms);
  const int64_t n = x.size(0), dim = x.size(1);
  const int64_t num_codebooks = codebooks.size(0), num_entries = codebooks.size(1);
  auto codes = at::empty({n, num_codebooks}, x.options().dtype(at::kLong));
  auto quantized = return_quantized ? at::empty({n, num_codebooks, dim}, x.options()) : at::empty({0}, x.options());
  const float* book_data = codebooks.data_ptr<float>();
  const float* norm_data = sqnorms.data_ptr<float>();
  int64_t* code_data = codes.data_ptr<int64_t>();
  float* quantized_data = return_quantized ? quantized.data_ptr<float>() : nullptr;
  const int64_t chunk = std::min(num_entries, kEntriesPerChunk);

  auto scores = at::empty({std::min(n, kRowsPerBlock), chunk}, x.options());
  std::vector<ScoredIndex> best(kRowsPerBlock);
  for (int64_t row0 = 0; row0 < n; row0 += kRowsPerBlock) {
    const int64_t rows = std::min(kRowsPerBlock, n - row0);
    auto residual = x.narrow(0, row0, rows).clone();
    float* residual_data = residual.data_ptr<float>();
    for (int64_t k = 0; k < num_codebooks; ++k) {
      std::fill(best.begin(), best.end(), no_candidate());
      for (int64_t c0 = 0; c0 < num_entries; c0 += chunk) {
        const int64_t len = std::min(chunk, num_entries - c0);
        auto dots = scores.narrow(1, 0, len).narrow(0, 0, rows);
        at::mm_out(dots, residual, codebooks[k].narrow(0, c0, len).t());  // BLAS, all threads
        float* dot_data = dots.data_ptr<float>();
        const int64_t stride = dots.stride(0);
        at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const auto candidate = best_in_chunk(norm_data + k * num_entries + c0, dot_data + i * stride, len, c0);
            best[i] = better_of(best[i], candidate);
          }
        });
      }
      at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t code = best[i].index == no_candidate().index ? 0 : best[i].index;  // an all-NaN row
          const float* entry = book_data + entry_offset(k, code, num_entries, dim);
          float* r = residual_data + i * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) r[d] -= entry[d];
          code_data[(row0 + i) * num_codebooks + k] = code;
          if (quantized_data != nullptr) {
            std::copy(entry, entry + dim, quantized_data + quantized_offset(row0 + i, k, num_codebooks, dim));
          }
        }
      });
    }
  }
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
