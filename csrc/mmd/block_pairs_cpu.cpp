// Test hook of the symmetric block-pair mapping (block_pairs.h) that the CUDA kernels run: the same __host__
// __device__ functions evaluated on the CPU, so tests/test_mmd_block_pairs.py can check it without a GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "mmd/block_pairs.h"

namespace mmdkernels {
namespace mmd {
namespace {

// row_blocks: int64 [R] in [0, num_blocks) -> int64 [R, max_owned_steps(num_blocks)]: out[i, s] is the column block
// of row block row_blocks[i]'s step s (0: the diagonal), -1 past the blocks it owns.
at::Tensor symmetric_block_pairs_cpu(const at::Tensor& row_blocks, int64_t num_blocks) {
  MMD_CHECK_DEVICE(row_blocks, at::Device(at::kCPU));
  MMD_CHECK_DTYPE(row_blocks, at::kLong);
  MMD_CHECK_DIM(row_blocks, 1);
  TORCH_CHECK(num_blocks >= 1, "num_blocks must be at least 1, got ", num_blocks);
  const auto rows = row_blocks.contiguous();
  const int64_t steps = max_owned_steps(num_blocks);
  auto out = at::full({rows.size(0), steps}, -1, rows.options());
  const int64_t* r = rows.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < num_blocks, "row_blocks must lie in [0, ", num_blocks, "), got ", r[i]);
    for (int64_t s = 0; s <= owned_offsets(r[i], num_blocks); ++s) {
      o[i * steps + s] = owned_column_block(r[i], s, num_blocks);
    }
  }
  return out;
}

}  // namespace
}  // namespace mmd
}  // namespace mmdkernels

TORCH_LIBRARY_IMPL(mmdkernels, CPU, m) {
  m.impl("symmetric_block_pairs", &mmdkernels::mmd::symmetric_block_pairs_cpu);
}
