// Which block pairs of a symmetric N x N plane (the shuffle's xx and yy terms, dHSIC's per-codebook Grams) a row
// block computes, so that every unordered pair of blocks is computed once. Cyclic ownership on a fixed grid of
// `block`-sample blocks (nb of them): row block r owns its diagonal block (step 0, both triangles, row side only) and
// the column blocks r+1 .. r+owned_offsets(r) mod nb (steps 1.., "mirrored": each entry stands for its transpose too,
// so it counts twice and its gradient goes to its row and, transposed, to its column). Every row block owns about
// nb/2 + 1 blocks, and since ownership depends only on the global block index, the row-range ops over any partition
// of the rows cover every pair exactly once. Shared by the CUDA kernels (tiles_cuda.h), the CPU test hook
// (block_pairs_cpu.cpp) and, re-stated in Triton, triton_common.owned_offsets; the CPU tiles (tiles_cpu.cpp) use the
// same rule and can include this header.
#pragma once

#include <cstdint>

#include "mmd/mmd_tile.h"

namespace mmdkernels {
namespace mmd {

// Number of blocks of `block` samples covering n samples.
MMD_HD int64_t num_sample_blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

// How many off-diagonal column blocks row block r of nb owns: (nb - 1) / 2, and with an even nb one more (the
// block nb/2 away, which both halves would otherwise share) for the first nb/2 row blocks.
MMD_HD int64_t owned_offsets(int64_t r, int64_t nb) { return (nb - 1) / 2 + ((nb % 2 == 0 && r < nb / 2) ? 1 : 0); }

// The most steps any row block takes: its diagonal plus at most nb/2 owned blocks.
MMD_HD int64_t max_owned_steps(int64_t nb) { return 1 + nb / 2; }

// The column block of row block r's step s, 0 <= s <= owned_offsets(r, nb) (step 0: the diagonal block r).
MMD_HD int64_t owned_column_block(int64_t r, int64_t s, int64_t nb) { return (r + s) % nb; }

}  // namespace mmd
}  // namespace mmdkernels
