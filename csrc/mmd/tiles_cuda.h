// Device code of the CUDA MMD ops (host side and registration: mmd_cuda.cu; contract: docs/mmd_kernels.md). One
// pass per term fuses the per-codebook squared distances, group distances, every bandwidth and the loss/gradient
// weights; nothing N x N is stored. A CTA owns a block of 64 rows (32 for many codebooks) and walks a range of column
// tiles, flash-attention style. A symmetric plane (xx, yy, dHSIC's Grams) is walked once per unordered pair of blocks
// (block_pairs.h): a row block visits its diagonal tile and the column blocks it owns, whose "mirrored" tiles count
// twice and also deliver their column side (sums, gradient) to the column block's rows. The K distance tiles of a
// (row block, column tile) pair come from a shared-memory tiled float32 FMA product over D (no TF32) and stay in
// shared memory, where the gradient weights W_k overwrite them in place for the W @ B products. Arithmetic is float32
// (mmd_tile.h); loss partials are summed in double across tiles, gradients by float32 atomics (as before the
// symmetric walk, so the column side's atomics change nothing here: gradients vary in the last bits run to run).
#pragma once

#if !defined(__CUDACC__)
#error "mmd/tiles_cuda.h holds CUDA device code: include it from .cu sources only"
#endif

#include <cstdint>

#include "mmd/block_pairs.h"
#include "mmd/mmd_tile.h"

namespace mmdkernels {
namespace mmd {


constexpr int kThreads = 256;
constexpr int kThreadGrid = 16;                        // threads form a 16 x 16 grid over every tile
constexpr int kChunk = 32;                             // D values staged per step of the tiled products
constexpr int kStageStride = kChunk + 4;               // keeps rows 16-byte aligned and float4 reads conflict-free
constexpr int kChunkPerThread = kChunk / kThreadGrid;  // gradient columns per thread and chunk

enum class Pass { kShuffle, kDhsicSums, kDhsicGrad };

struct TileArgs {
  const float* rows;       // [N, K, D]: samples of the row blocks (x, or y for the yy term)
  const float* cols;       // [N, K, D]: samples of the column tiles
  const float* row_norms;  // [N, K]: squared norms of the codebook slices of `rows`
  const float* col_norms;  // [N, K]
  const int32_t* groups;   // [G, K], 0/1
  int num_samples;
  int row_begin;  // the rows [row_begin, row_end) of the N x N plane are computed (symmetric: their owned pairs)
  int row_end;
  int num_codebooks;
  int dim;
  int num_groups;
  int tiles_per_split;  // column steps per CTA (blockIdx.y picks the range)
  bool same_set;        // rows == cols: the diagonal is skipped (shuffle) or has distance exactly 0 (dHSIC)
  bool symmetric;       // walk the owned block pairs of the plane (block_pairs.h), else every column tile
  int first_block;      // symmetric: blockIdx.x = 0 is the global row block first_block (row_begin / T)
  int num_blocks;       // blocks of T samples covering N
  bool compute_grad;
  float term_weight;  // shuffle: w_xx, w_yy or w_xy
  float row_factor;   // gradient of a side = factor * (rowsum(W) * self - W @ other)
  float col_factor;   // (the column side of a two-sided term or of a mirrored tile)
  float* grad_rows;       // [N, K, D], indexed like `rows` (a symmetric term's column side too)
  float* grad_cols;       // [N, K, D], indexed like `cols`; null for a one-set term
  double* loss_partials;  // [gridDim.y * gridDim.x], or null
  double* row_sums;       // dHSIC pass 1: [K, A, N], sum_m E_{k,a}(n, m)
  const float* gamma;     // dHSIC pass 2: [K, A]
  const float* beta;      // dHSIC pass 2: [K, A, N]
  float inv_n2;
};

template <int T>
struct TileShape {
  static constexpr int kPerThread = T / kThreadGrid;  // tile rows (and columns) each thread owns
  static constexpr int kStride = T + 4;               // row stride of a distance/weight tile
  static constexpr int kFloats = T * kStride;
  static constexpr int kStageFloats = T * kStageStride;

  // Two stage buffers, K distance/weight tiles, row and column sums of W per codebook, one mask per group.
  static size_t shared_bytes(int64_t num_codebooks, int64_t num_groups) {
    return sizeof(float) * (2 * kStageFloats + num_codebooks * (kFloats + 2 * T)) + sizeof(uint32_t) * num_groups;
  }
};

__device__ __forceinline__ float4 load_float4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// stage[i][dd] = samples[first + i, k, d0 + dd], zero outside the samples and past D.
template <int T>
__device__ void stage_chunk(const TileArgs& args, const float* samples, int first, int k, int d0, float* stage) {
  for (int idx = threadIdx.x; idx < T * kChunk; idx += kThreads) {
    const int i = idx / kChunk, dd = idx % kChunk;
    const int n = first + i, d = d0 + dd;
    stage[i * kStageStride + dd] =
        (n < args.num_samples && d < args.dim)
            ? samples[(static_cast<int64_t>(n) * args.num_codebooks + k) * args.dim + d]
            : 0.0f;
  }
}

// Squared distances of codebook k between the row block and the column tile, into this thread's entries
// (ty + 16 i, tx + 16 j) of `dist`; 0 on the diagonal of a same-set tile and outside the samples.
template <int T>
__device__ void distance_tile(const TileArgs& args, int k, int row0, int col0, float* stage_a, float* stage_b,
                              float* dist) {
  constexpr int P = TileShape<T>::kPerThread;
  const int tx = threadIdx.x % kThreadGrid, ty = threadIdx.x / kThreadGrid;
  float dot[P][P] = {};
  for (int d0 = 0; d0 < args.dim; d0 += kChunk) {
    // Also orders this tile's first distance writes after every read of the previous tile's weights.
    __syncthreads();
    stage_chunk<T>(args, args.rows, row0, k, d0, stage_a);
    stage_chunk<T>(args, args.cols, col0, k, d0, stage_b);
    __syncthreads();
#pragma unroll
    for (int dd = 0; dd < kChunk; dd += 4) {
      float4 a[P], b[P];
#pragma unroll
      for (int i = 0; i < P; ++i) a[i] = load_float4(stage_a + (ty + kThreadGrid * i) * kStageStride + dd);
#pragma unroll
      for (int j = 0; j < P; ++j) b[j] = load_float4(stage_b + (tx + kThreadGrid * j) * kStageStride + dd);
#pragma unroll
      for (int i = 0; i < P; ++i) {
#pragma unroll
        for (int j = 0; j < P; ++j) {
          dot[i][j] = fmaf(a[i].x, b[j].x, dot[i][j]);
          dot[i][j] = fmaf(a[i].y, b[j].y, dot[i][j]);
          dot[i][j] = fmaf(a[i].z, b[j].z, dot[i][j]);
          dot[i][j] = fmaf(a[i].w, b[j].w, dot[i][j]);
        }
      }
    }
  }
  const int num_codebooks = args.num_codebooks;
#pragma unroll
  for (int i = 0; i < P; ++i) {
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int r = ty + kThreadGrid * i, c = tx + kThreadGrid * j;
      const int row = row0 + r, col = col0 + c;
      float d = 0.0f;
      if (row >= args.row_begin && row < args.row_end && col < args.num_samples && !(args.same_set && row == col)) {
        d = sqdist_from_dot(args.row_norms[static_cast<int64_t>(row) * num_codebooks + k],
                            args.col_norms[static_cast<int64_t>(col) * num_codebooks + k], dot[i][j]);
      }
      dist[r * TileShape<T>::kStride + c] = d;
    }
  }
}

// One of this thread's P x P tile entries: position in the tile, sample indices, and whether both are samples.
template <int T>
struct TileEntry {
  int r, c, row, col;
  bool in_range;
  __device__ TileEntry(int index, int row0, int col0, const TileArgs& args) {
    constexpr int P = TileShape<T>::kPerThread;
    r = threadIdx.x / kThreadGrid + kThreadGrid * (index / P);
    c = threadIdx.x % kThreadGrid + kThreadGrid * (index % P);
    row = row0 + r;
    col = col0 + c;
    in_range = row >= args.row_begin && row < args.row_end && col < args.num_samples;
  }
};

template <int T>
__device__ __forceinline__ float group_distance(const float* entry, uint32_t mask) {
  float sum = 0.0f;
  for (uint32_t bits = mask; bits != 0u; bits &= bits - 1u) sum += entry[(__ffs(bits) - 1) * TileShape<T>::kFloats];
  return sum;
}

// w[k] += value for every codebook k of the group; fully unrolled so that w stays in registers.
__device__ __forceinline__ void add_to_members(float (&w)[kMaxCodebooks], uint32_t mask, float value) {
#pragma unroll
  for (int k = 0; k < kMaxCodebooks; ++k) {
    if ((mask >> k) == 0u) break;
    if ((mask >> k) & 1u) w[k] += value;
  }
}

// entry[k] op= w[k] for k < K (assign, or add), unrolled for the same reason.
template <int T, bool kAdd>
__device__ __forceinline__ void store_weights(float* entry, const float (&w)[kMaxCodebooks], int num_codebooks) {
#pragma unroll
  for (int k = 0; k < kMaxCodebooks; ++k) {
    if (k == num_codebooks) break;
    float& slot = entry[k * TileShape<T>::kFloats];
    slot = kAdd ? slot + w[k] : w[k];
  }
}

// Shuffle term: returns this thread's weighted loss sum over its entries; with compute_grad, replaces each entry's
// distances by W_k = sum_{g contains k} slope_g (0 where the entry is skipped).
template <int T>
__device__ float shuffle_weights(const TileArgs& args, const BandwidthPlan& plan, float* tiles,
                                 const uint32_t* group_masks, int row0, int col0) {
  constexpr int P = TileShape<T>::kPerThread;
  float value = 0.0f;
  for (int index = 0; index < P * P; ++index) {
    const TileEntry<T> e(index, row0, col0, args);
    float* entry = tiles + e.r * TileShape<T>::kStride + e.c;
    float w[kMaxCodebooks] = {};
    if (e.in_range && !(args.same_set && e.row == e.col)) {
      for (int g = 0; g < args.num_groups; ++g) {
        float slope = 0.0f;
        shuffle_entry(group_distance<T>(entry, group_masks[g]), plan, args.term_weight, &value, &slope);
        if (args.compute_grad) add_to_members(w, group_masks[g], slope);
      }
    }
    if (args.compute_grad) store_weights<T, false>(entry, w, args.num_codebooks);
  }
  return value;
}

// dHSIC pass 1, joint part: sum over groups and bandwidths of e_a(D_g) on this thread's entries (diagonal included).
template <int T>
__device__ float dhsic_joint_sums(const TileArgs& args, const BandwidthPlan& plan, const float* tiles,
                                  const uint32_t* group_masks, int row0, int col0) {
  constexpr int P = TileShape<T>::kPerThread;
  float value = 0.0f;
  for (int index = 0; index < P * P; ++index) {
    const TileEntry<T> e(index, row0, col0, args);
    if (!e.in_range) continue;
    const float* entry = tiles + e.r * TileShape<T>::kStride + e.c;
    for (int g = 0; g < args.num_groups; ++g) {
      float kernel[kMaxBandwidths];
      eval_bandwidths(group_distance<T>(entry, group_masks[g]), plan, kernel);
#pragma unroll
      for (int a = 0; a < kMaxBandwidths; ++a) {
        if (a < plan.count) value += kernel[a];
      }
    }
  }
  return value;
}

// dHSIC pass 1, marginal part: row_sums[k, a, n] += sum over the tile's columns of E_{k,a}(n, m). The 16 threads
// sharing a row (one half-warp) reduce by shuffles; one of them adds to global memory. A mirrored tile also adds its
// column sums to its columns' rows (E is symmetric): per-thread partials over its rows, reduced through `scratch`
// (T * kMaxBandwidths floats of shared memory) by shared atomics, then one global atomic per column and bandwidth.
template <int T>
__device__ void dhsic_row_sums(const TileArgs& args, const BandwidthPlan& plan, const float* tiles, int row0,
                               int col0, bool mirrored, float* scratch) {
  constexpr int P = TileShape<T>::kPerThread;
  const int tx = threadIdx.x % kThreadGrid, ty = threadIdx.x / kThreadGrid;
  for (int k = 0; k < args.num_codebooks; ++k) {
    if (mirrored) {     // uniform across the CTA
      __syncthreads();  // every thread is done with the stage buffer / the previous codebook's column sums
      for (int idx = threadIdx.x; idx < T * kMaxBandwidths; idx += kThreads) scratch[idx] = 0.0f;
      __syncthreads();
    }
    float col_sums[P][kMaxBandwidths] = {};
    for (int i = 0; i < P; ++i) {
      const int r = ty + kThreadGrid * i, row = row0 + r;
      const bool row_in_range = row >= args.row_begin && row < args.row_end;
      float sums[kMaxBandwidths] = {};
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const int c = tx + kThreadGrid * j;
        if (!row_in_range || col0 + c >= args.num_samples) continue;
        float kernel[kMaxBandwidths];
        eval_bandwidths(tiles[k * TileShape<T>::kFloats + r * TileShape<T>::kStride + c], plan, kernel);
#pragma unroll
        for (int a = 0; a < kMaxBandwidths; ++a) {
          if (a < plan.count) {
            sums[a] += kernel[a];
            col_sums[j][a] += kernel[a];
          }
        }
      }
#pragma unroll
      for (int a = 0; a < kMaxBandwidths; ++a) {
        if (a < plan.count) {  // uniform across the warp, so every lane takes part in the shuffles
          float sum = sums[a];
          for (int offset = kThreadGrid / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
          if (tx == 0 && row_in_range) {
            atomicAdd(&args.row_sums[(static_cast<int64_t>(k) * plan.count + a) * args.num_samples + row],
                      static_cast<double>(sum));
          }
        }
      }
    }
    if (!mirrored) continue;
#pragma unroll
    for (int j = 0; j < P; ++j) {
#pragma unroll
      for (int a = 0; a < kMaxBandwidths; ++a) {
        if (a < plan.count) atomicAdd(&scratch[(tx + kThreadGrid * j) * kMaxBandwidths + a], col_sums[j][a]);
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < T * plan.count; idx += kThreads) {
      const int c = idx / plan.count, a = idx % plan.count, col = col0 + c;
      if (col < args.num_samples) {
        atomicAdd(&args.row_sums[(static_cast<int64_t>(k) * plan.count + a) * args.num_samples + col],
                  static_cast<double>(scratch[c * kMaxBandwidths + a]));
      }
    }
  }
}

// dHSIC pass 2: replaces each entry's distances by W_k(n, m) = sum_a dhsic_entry_weight(...). The joint part is
// linear in J_{k,a} = sum_{g contains k} e_a(D_g), so it is accumulated per group and the per-codebook part added.
// The diagonal (z_n - z_n = 0) and out-of-range entries get W = 0.
template <int T>
__device__ void dhsic_weights(const TileArgs& args, const BandwidthPlan& plan, float* tiles,
                              const uint32_t* group_masks, int row0, int col0) {
  constexpr int P = TileShape<T>::kPerThread;
  const int64_t n = args.num_samples;
  for (int index = 0; index < P * P; ++index) {
    const TileEntry<T> e(index, row0, col0, args);
    float* entry = tiles + e.r * TileShape<T>::kStride + e.c;
    float w[kMaxCodebooks] = {};
    if (!e.in_range || e.row == e.col) {
      store_weights<T, false>(entry, w, args.num_codebooks);
      continue;
    }
    for (int g = 0; g < args.num_groups; ++g) {
      float kernel[kMaxBandwidths];
      eval_bandwidths(group_distance<T>(entry, group_masks[g]), plan, kernel);
      float joint_weight = 0.0f;
#pragma unroll
      for (int a = 0; a < kMaxBandwidths; ++a) {
        if (a < plan.count) {
          joint_weight += dhsic_entry_weight(plan.coef[a], args.inv_n2, kernel[a], 0.0f, 0.0f, 0.0f, 0.0f);
        }
      }
      add_to_members(w, group_masks[g], joint_weight);
    }
    // Every group distance is done, so the distances can now be overwritten one codebook at a time.
    for (int k = 0; k < args.num_codebooks; ++k) {
      float& slot = entry[k * TileShape<T>::kFloats];
      float kernel[kMaxBandwidths];
      eval_bandwidths(slot, plan, kernel);
      float weight = 0.0f;
#pragma unroll
      for (int a = 0; a < kMaxBandwidths; ++a) {
        if (a < plan.count) {
          const int64_t ka = static_cast<int64_t>(k) * plan.count + a;
          weight += dhsic_entry_weight(plan.coef[a], args.inv_n2, 0.0f, kernel[a], args.gamma[ka],
                                       args.beta[ka * n + e.row], args.beta[ka * n + e.col]);
        }
      }
      slot = weight;
    }
    store_weights<T, true>(entry, w, args.num_codebooks);
  }
}

// Row sums (and, for a two-sided term, column sums) of every W_k tile.
template <int T>
__device__ void weight_sums(const float* tiles, int num_codebooks, bool with_columns, float* row_sums,
                            float* col_sums) {
  for (int idx = threadIdx.x; idx < num_codebooks * T; idx += kThreads) {
    const float* w = tiles + (idx / T) * TileShape<T>::kFloats;
    const int o = idx % T;
    float row = 0.0f;
    for (int i = 0; i < T; i += 4) {
      const float4 v = load_float4(w + o * TileShape<T>::kStride + i);
      row += (v.x + v.y) + (v.z + v.w);
    }
    row_sums[idx] = row;
    if (with_columns) {
      float col = 0.0f;
      for (int i = 0; i < T; ++i) col += w[i * TileShape<T>::kStride + o];
      col_sums[idx] = col;
    }
  }
}

// grad[self n, k, :] += factor * (wsum[n] * self[n, k, :] - sum_i W(n, i) other[i, k, :]) for codebook k, where
// the row side takes W as stored (self: rows, other: columns) and the column side its transpose.
template <int T, bool kColumnSide>
__device__ void accumulate_gradient(const TileArgs& args, int k, int row0, int col0, const float* weights,
                                    const float* wsum, float factor, float* grad, float* stage) {
  constexpr int P = TileShape<T>::kPerThread;
  constexpr int S = TileShape<T>::kStride;
  const float* self = kColumnSide ? args.cols : args.rows;
  const float* other = kColumnSide ? args.rows : args.cols;
  const int self0 = kColumnSide ? col0 : row0;
  const int other0 = kColumnSide ? row0 : col0;
  const int tx = threadIdx.x % kThreadGrid, ty = threadIdx.x / kThreadGrid;
  for (int d0 = 0; d0 < args.dim; d0 += kChunk) {
    __syncthreads();
    stage_chunk<T>(args, other, other0, k, d0, stage);
    __syncthreads();
    float acc[P][kChunkPerThread] = {};
    if constexpr (!kColumnSide) {
      // outputs o = ty + 16 mi: W(o, i..i+3) is one float4
      for (int i = 0; i < T; i += 4) {
        float4 w[P];
#pragma unroll
        for (int mi = 0; mi < P; ++mi) w[mi] = load_float4(weights + (ty + kThreadGrid * mi) * S + i);
#pragma unroll
        for (int mj = 0; mj < kChunkPerThread; ++mj) {
          const float* b = stage + i * kStageStride + tx + kThreadGrid * mj;
          const float b0 = b[0], b1 = b[kStageStride], b2 = b[2 * kStageStride], b3 = b[3 * kStageStride];
#pragma unroll
          for (int mi = 0; mi < P; ++mi) {
            float a = acc[mi][mj];
            a = fmaf(w[mi].x, b0, a);
            a = fmaf(w[mi].y, b1, a);
            a = fmaf(w[mi].z, b2, a);
            a = fmaf(w[mi].w, b3, a);
            acc[mi][mj] = a;
          }
        }
      }
    } else {
      // outputs o = P ty + mi: W(i, o..o+P-1) is contiguous in the tile row
      for (int i = 0; i < T; ++i) {
        const float* w = weights + i * S + P * ty;
#pragma unroll
        for (int mj = 0; mj < kChunkPerThread; ++mj) {
          const float b = stage[i * kStageStride + tx + kThreadGrid * mj];
#pragma unroll
          for (int mi = 0; mi < P; ++mi) acc[mi][mj] = fmaf(w[mi], b, acc[mi][mj]);
        }
      }
    }
#pragma unroll
    for (int mi = 0; mi < P; ++mi) {
      const int o = kColumnSide ? P * ty + mi : ty + kThreadGrid * mi;
      const int sample = self0 + o;
      if (kColumnSide ? sample >= args.num_samples : (sample < args.row_begin || sample >= args.row_end)) continue;
#pragma unroll
      for (int mj = 0; mj < kChunkPerThread; ++mj) {
        const int d = d0 + tx + kThreadGrid * mj;
        if (d >= args.dim) continue;
        const int64_t at = (static_cast<int64_t>(sample) * args.num_codebooks + k) * args.dim + d;
        atomicAdd(grad + at, factor * (wsum[o] * self[at] - acc[mi][mj]));
      }
    }
  }
}

// Sums `value` over the CTA (warp shuffles, then one double per warp in `scratch`) and stores it to *out.
inline __device__ void store_block_sum(double value, double* scratch, double* out) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  __syncthreads();  // scratch aliases a stage buffer that other warps may still read
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int warp = 0; warp < kThreads / 32; ++warp) total += scratch[warp];
    *out = total;
  }
}

template <int T, Pass kPass>
__global__ void __launch_bounds__(kThreads) mmd_tiles_kernel(const __grid_constant__ TileArgs args,
                                                             const __grid_constant__ BandwidthPlan plan) {
  using Shape = TileShape<T>;
  extern __shared__ float4 shared_storage[];
  float* stage_a = reinterpret_cast<float*>(shared_storage);
  float* stage_b = stage_a + Shape::kStageFloats;
  float* tiles = stage_b + Shape::kStageFloats;
  float* row_wsums = tiles + args.num_codebooks * Shape::kFloats;
  float* col_wsums = row_wsums + args.num_codebooks * T;
  uint32_t* group_masks = reinterpret_cast<uint32_t*>(col_wsums + args.num_codebooks * T);

  for (int g = threadIdx.x; g < args.num_groups; g += kThreads) {
    uint32_t mask = 0u;
    for (int k = 0; k < args.num_codebooks; ++k) {
      if (args.groups[static_cast<int64_t>(g) * args.num_codebooks + k] != 0) mask |= 1u << k;
    }
    group_masks[g] = mask;
  }
  __syncthreads();

  // A row block's steps: every column tile, or (symmetric) its diagonal tile and the column blocks it owns.
  const int row_block = args.first_block + static_cast<int>(blockIdx.x);
  const int row0 = args.symmetric ? row_block * T : args.row_begin + static_cast<int>(blockIdx.x) * T;
  const int num_steps =
      args.symmetric ? 1 + static_cast<int>(owned_offsets(row_block, args.num_blocks)) : args.num_blocks;
  const int first_step = blockIdx.y * args.tiles_per_split;
  const int end_step = min(first_step + args.tiles_per_split, num_steps);
  double thread_total = 0.0;
  for (int step = first_step; step < end_step; ++step) {
    // a mirrored tile stands for its transpose too: its entries count twice, its column side gets the gradient
    const bool mirrored = args.symmetric && step > 0;
    const int col0 =
        (args.symmetric ? static_cast<int>(owned_column_block(row_block, step, args.num_blocks)) : step) * T;
    for (int k = 0; k < args.num_codebooks; ++k) {
      distance_tile<T>(args, k, row0, col0, stage_a, stage_b, tiles + k * Shape::kFloats);
    }
    // Each thread reads and rewrites only the entries it wrote above: no barrier until W is shared.
    if constexpr (kPass == Pass::kShuffle) {
      const float value = shuffle_weights<T>(args, plan, tiles, group_masks, row0, col0);
      thread_total += mirrored ? 2.0 * value : value;
    } else if constexpr (kPass == Pass::kDhsicSums) {
      const float value = dhsic_joint_sums<T>(args, plan, tiles, group_masks, row0, col0);
      thread_total += mirrored ? 2.0 * value : value;
      dhsic_row_sums<T>(args, plan, tiles, row0, col0, mirrored, stage_b);
    } else {
      dhsic_weights<T>(args, plan, tiles, group_masks, row0, col0);
    }
    if constexpr (kPass != Pass::kDhsicSums) {
      if (!args.compute_grad) continue;
      const bool column_side = mirrored || args.grad_cols != nullptr;
      float* grad_cols = mirrored ? args.grad_rows : args.grad_cols;
      __syncthreads();
      weight_sums<T>(tiles, args.num_codebooks, column_side, row_wsums, col_wsums);
      __syncthreads();
      for (int k = 0; k < args.num_codebooks; ++k) {
        const float* weights = tiles + k * Shape::kFloats;
        accumulate_gradient<T, false>(args, k, row0, col0, weights, row_wsums + k * T, args.row_factor,
                                      args.grad_rows, stage_a);
        if (column_side) {
          accumulate_gradient<T, true>(args, k, row0, col0, weights, col_wsums + k * T, args.col_factor, grad_cols,
                                       stage_a);
        }
      }
    }
  }
  if (args.loss_partials != nullptr) {
    store_block_sum(thread_total, reinterpret_cast<double*>(stage_a),
                    args.loss_partials + static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x);
  }
}

}  // namespace mmd
}  // namespace mmdkernels
