// CUDA backend of the fused RVQ ops (contract: docs/rvq_kernels.md). Encode runs all K greedy stages in one kernel:
// a CTA owns a block of 64 rows (32 when that fills the GPU better) whose residuals stay in shared memory for every
// stage. Per stage it streams the codebook in tiles of 64 entries x 32 features through double-buffered shared memory;
// a 16 x 16 thread grid computes the rows x entries dot tile with float32 FMAs (no TF32) and folds each finished score
// tile straight into a running (score, lowest index) per row in registers; the chosen entries are then subtracted
// from the residuals in place. Decode is a gather-sum over k = 0..K-1 in order. Arithmetic is float32 (rvq_tile.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "common/checks.h"
#include "rvq/rvq_tile.h"

namespace mmdkernels {
namespace rvq {
namespace {

constexpr int kThreads = 256;
constexpr int kThreadGrid = 16;                                  // threads form a 16 x 16 grid over a score tile
constexpr int kTileEntries = 64;                                 // codebook entries per score tile
constexpr int kChunk = 32;                                       // features staged per step
constexpr int kStageStride = kChunk + 4;                         // 16-byte aligned rows, conflict-free float4 reads
constexpr int kStageFloats = kTileEntries * kStageStride;        // one stage buffer
constexpr int kEntriesPerThread = kTileEntries / kThreadGrid;    // score columns each thread owns
constexpr int kStageLoadsPerThread = kTileEntries * kChunk / kThreads;

struct EncodeArgs {
  const float* x;          // [N, D]
  const float* codebooks;  // [K, C, D]
  const float* sqnorms;    // [K, C]
  int64_t* codes;          // [N, K]
  float* quantized;        // [N, K, D], or null
  int num_rows;
  int num_codebooks;
  int num_entries;
  int dim;
  int padded_dim;  // dim rounded up to kChunk; the residual rows are zero past dim
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t padded_dim_of(int64_t dim) { return ceil_div(dim, kChunk) * kChunk; }

// Two stage buffers, the residual block (row stride padded_dim + 4 keeps float4 rows aligned and spreads the rows of
// a warp's reads over banks), and the code chosen for each row in the current stage.
size_t encode_shared_bytes(int rows, int64_t padded_dim) {
  return sizeof(float) * (2 * kStageFloats + rows * (padded_dim + 4)) + sizeof(int64_t) * rows;
}

__device__ __forceinline__ float4 load_float4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// Step s of a stage covers entries [tile * 64, +64) and features [chunk * 32, +32), tile = s / chunks_per_tile.
// Each warp reads 32 consecutive features of one entry; zero outside the codebook and past D.
__device__ __forceinline__ void load_step(const EncodeArgs& args, const float* book, int step, int chunks_per_tile,
                                          float (&values)[kStageLoadsPerThread]) {
  const int tile = step / chunks_per_tile;
  const int d = (step - tile * chunks_per_tile) * kChunk + threadIdx.x % kChunk;
#pragma unroll
  for (int t = 0; t < kStageLoadsPerThread; ++t) {
    const int entry = tile * kTileEntries + (threadIdx.x + t * kThreads) / kChunk;
    values[t] = (entry < args.num_entries && d < args.dim)
                    ? __ldg(book + static_cast<int64_t>(entry) * args.dim + d)
                    : 0.0f;
  }
}

__device__ __forceinline__ void store_step(const float (&values)[kStageLoadsPerThread], float* stage) {
#pragma unroll
  for (int t = 0; t < kStageLoadsPerThread; ++t) {
    const int idx = threadIdx.x + t * kThreads;
    stage[(idx / kChunk) * kStageStride + idx % kChunk] = values[t];
  }
}

template <int kRows>
__global__ void __launch_bounds__(kThreads, 2) rvq_encode_kernel(const __grid_constant__ EncodeArgs args) {
  constexpr int kRowsPerThread = kRows / kThreadGrid;
  extern __shared__ float4 shared_storage[];
  float* stage = reinterpret_cast<float*>(shared_storage);
  float* residual = stage + 2 * kStageFloats;
  const int residual_stride = args.padded_dim + 4;
  int64_t* chosen = reinterpret_cast<int64_t*>(residual + kRows * residual_stride);

  const int tx = threadIdx.x % kThreadGrid, ty = threadIdx.x / kThreadGrid;
  const int row0 = blockIdx.x * kRows;
  const int dim = args.dim;

  for (int idx = threadIdx.x; idx < kRows * args.padded_dim; idx += kThreads) {
    const int r = idx / args.padded_dim, d = idx % args.padded_dim;
    const int row = row0 + r;
    residual[r * residual_stride + d] =
        (row < args.num_rows && d < dim) ? args.x[static_cast<int64_t>(row) * dim + d] : 0.0f;
  }

  const int chunks_per_tile = args.padded_dim / kChunk;
  const int num_steps = (args.num_entries + kTileEntries - 1) / kTileEntries * chunks_per_tile;
  for (int k = 0; k < args.num_codebooks; ++k) {
    const float* book = args.codebooks + entry_offset(k, 0, args.num_entries, dim);
    const float* norms = args.sqnorms + static_cast<int64_t>(k) * args.num_entries;

    // Also orders the previous stage's residual and `chosen` writes (or the initial residual load) before any read.
    float next[kStageLoadsPerThread];
    load_step(args, book, 0, chunks_per_tile, next);
    store_step(next, stage);
    __syncthreads();

    ScoredIndex best[kRowsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) best[i] = no_candidate();
    float dot[kRowsPerThread][kEntriesPerThread];
    float tile_norms[kEntriesPerThread];

    // One barrier per step: step s reads buffer s & 1 while step s + 1 is fetched into registers, then written to the
    // other buffer, which every thread finished reading before the barrier that ended step s - 1.
    for (int step = 0; step < num_steps; ++step) {
      const int tile = step / chunks_per_tile, chunk = step - tile * chunks_per_tile;
      const int entry0 = tile * kTileEntries;
      if (chunk == 0) {
#pragma unroll
        for (int j = 0; j < kEntriesPerThread; ++j) {
          const int entry = entry0 + tx + kThreadGrid * j;
          tile_norms[j] = entry < args.num_entries ? __ldg(norms + entry) : 0.0f;
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) dot[i][j] = 0.0f;
        }
      }
      const bool has_next = step + 1 < num_steps;
      if (has_next) load_step(args, book, step + 1, chunks_per_tile, next);

      const float* entries = stage + (step & 1) * kStageFloats;
      const float* rows = residual + chunk * kChunk;
#pragma unroll
      for (int dd = 0; dd < kChunk; dd += 4) {
        float4 a[kRowsPerThread], b[kEntriesPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          a[i] = load_float4(rows + (ty + kThreadGrid * i) * residual_stride + dd);
        }
#pragma unroll
        for (int j = 0; j < kEntriesPerThread; ++j) {
          b[j] = load_float4(entries + (tx + kThreadGrid * j) * kStageStride + dd);
        }
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
          for (int j = 0; j < kEntriesPerThread; ++j) {
            dot[i][j] = fmaf(a[i].x, b[j].x, dot[i][j]);
            dot[i][j] = fmaf(a[i].y, b[j].y, dot[i][j]);
            dot[i][j] = fmaf(a[i].z, b[j].z, dot[i][j]);
            dot[i][j] = fmaf(a[i].w, b[j].w, dot[i][j]);
          }
        }
      }

      if (chunk == chunks_per_tile - 1) {
#pragma unroll
        for (int j = 0; j < kEntriesPerThread; ++j) {
          const int entry = entry0 + tx + kThreadGrid * j;
          if (entry >= args.num_entries) continue;
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) {
            best[i] = better_of(best[i], ScoredIndex{entry_score(tile_norms[j], dot[i][j]), entry});
          }
        }
      }
      if (has_next) store_step(next, stage + ((step + 1) & 1) * kStageFloats);
      __syncthreads();
    }

    // The 16 threads of a row are one half-warp (consecutive lanes); better_of is a total order, so the butterfly
    // leaves every lane with the first minimum of the row.
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      for (int offset = kThreadGrid / 2; offset > 0; offset /= 2) {
        const ScoredIndex other{__shfl_xor_sync(0xffffffffu, best[i].score, offset),
                                __shfl_xor_sync(0xffffffffu, best[i].index, offset)};
        best[i] = better_of(best[i], other);
      }
      if (tx == 0) {
        const int r = ty + kThreadGrid * i, row = row0 + r;
        const int64_t code = best[i].index < args.num_entries ? best[i].index : 0;
        chosen[r] = code;
        if (row < args.num_rows) args.codes[static_cast<int64_t>(row) * args.num_codebooks + k] = code;
      }
    }
    __syncthreads();

    for (int idx = threadIdx.x; idx < kRows * dim; idx += kThreads) {
      const int r = idx / dim, d = idx % dim;
      const int row = row0 + r;
      if (row >= args.num_rows) break;  // r only grows along this thread's loop
      const float value = __ldg(book + chosen[r] * dim + d);
      residual[r * residual_stride + d] -= value;
      if (args.quantized != nullptr) args.quantized[quantized_offset(row, k, args.num_codebooks, dim) + d] = value;
    }
  }
}

__global__ void __launch_bounds__(kThreads) rvq_decode_kernel(const int64_t* __restrict__ codes,
                                                              const float* __restrict__ codebooks,
                                                              float* __restrict__ out, int64_t num_rows,
                                                              int num_codebooks, int64_t num_entries, int64_t dim) {
  const int64_t total = num_rows * dim;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = idx / dim, d = idx % dim;
    const int64_t* row_codes = codes + row * num_codebooks;
    float sum = __ldg(codebooks + entry_offset(0, __ldg(row_codes), num_entries, dim) + d);
    for (int k = 1; k < num_codebooks; ++k) {
      sum += __ldg(codebooks + entry_offset(k, __ldg(row_codes + k), num_entries, dim) + d);
    }
    out[idx] = sum;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

void check_codebooks(const at::Tensor& codebooks, const at::Device& device) {
  MMD_CHECK_DEVICE(codebooks, device);
  MMD_CHECK_DTYPE(codebooks, at::kFloat);
  MMD_CHECK_DIM(codebooks, 3);
  MMD_CHECK_CONTIGUOUS(codebooks);
  TORCH_CHECK(codebooks.size(0) >= 1 && codebooks.size(1) >= 1 && codebooks.size(1) <= INT32_MAX,
              "codebooks must have shape [K >= 1, C >= 1, D], got ", codebooks.sizes());
}

template <int kRows>
void launch_encode(const EncodeArgs& args, size_t shared_bytes) {
  auto* kernel = &rvq_encode_kernel<kRows>;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)));
  const unsigned blocks = static_cast<unsigned>(ceil_div(args.num_rows, kRows));
  kernel<<<blocks, kThreads, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> rvq_encode_cuda(const at::Tensor& x, const at::Tensor& codebooks,
                                                   const at::Tensor& sqnorms, bool return_quantized) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got a tensor on ", x.device());
  MMD_CHECK_DTYPE(x, at::kFloat);
  MMD_CHECK_DIM(x, 2);
  MMD_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.size(0) <= INT32_MAX, "x has too many rows: ", x.size(0));
  TORCH_CHECK(x.size(1) >= 1, "x must have shape [N, D >= 1], got ", x.sizes());
  check_codebooks(codebooks, x.device());
  TORCH_CHECK(codebooks.size(2) == x.size(1), "codebooks must have D = ", x.size(1), " (x's dim 1), got shape ",
              codebooks.sizes());
  MMD_CHECK_DEVICE(sqnorms, x.device());
  MMD_CHECK_DTYPE(sqnorms, at::kFloat);
  MMD_CHECK_SHAPE(sqnorms, codebooks.size(0), codebooks.size(1));
  MMD_CHECK_CONTIGUOUS(sqnorms);

  const int64_t num_rows = x.size(0), dim = x.size(1);
  const int64_t num_codebooks = codebooks.size(0), num_entries = codebooks.size(1);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor codes = at::empty({num_rows, num_codebooks}, x.options().dtype(at::kLong));
  at::Tensor quantized =
      return_quantized ? at::empty({num_rows, num_codebooks, dim}, x.options()) : at::empty({0}, x.options());
  if (num_rows == 0) return {codes, quantized};

  const int64_t padded_dim = padded_dim_of(dim);
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const size_t limit = props->sharedMemPerBlockOptin;
  const size_t bytes_32 = encode_shared_bytes(32, padded_dim), bytes_64 = encode_shared_bytes(64, padded_dim);
  if (bytes_32 > limit) {
    const int64_t fixed = static_cast<int64_t>(encode_shared_bytes(32, 0));
    const int64_t max_dim = ((static_cast<int64_t>(limit) - fixed) / (32 * sizeof(float)) - 4) / kChunk * kChunk;
    TORCH_CHECK(false, "rvq_encode (CUDA): x has D = ", dim, " features; the residual block needs ", bytes_32,
                " bytes of shared memory but this GPU allows ", limit, " per block, so D must be at most ", max_dim);
  }

  EncodeArgs args{};
  args.x = x.data_ptr<float>();
  args.codebooks = codebooks.data_ptr<float>();
  args.sqnorms = sqnorms.data_ptr<float>();
  args.codes = codes.data_ptr<int64_t>();
  args.quantized = return_quantized ? quantized.data_ptr<float>() : nullptr;
  args.num_rows = static_cast<int>(num_rows);
  args.num_codebooks = static_cast<int>(num_codebooks);
  args.num_entries = static_cast<int>(num_entries);
  args.dim = static_cast<int>(dim);
  args.padded_dim = static_cast<int>(padded_dim);
  // 64 rows per CTA halve the codebook traffic per row; 32 when 64 would leave SMs idle or not fit.
  if (bytes_64 <= limit && ceil_div(num_rows, 64) >= props->multiProcessorCount) {
    launch_encode<64>(args, bytes_64);
  } else {
    launch_encode<32>(args, bytes_32);
  }
  return {codes, quantized};
}

at::Tensor rvq_decode_cuda(const at::Tensor& codes, const at::Tensor& codebooks) {
  TORCH_CHECK(codes.is_cuda(), "codes must be a CUDA tensor, got a tensor on ", codes.device());
  MMD_CHECK_DTYPE(codes, at::kLong);
  MMD_CHECK_DIM(codes, 2);
  check_codebooks(codebooks, codes.device());
  TORCH_CHECK(codes.size(1) == codebooks.size(0), "codes must have K = ", codebooks.size(0),
              " columns (codebooks' dim 0), got shape ", codes.sizes());

  const int64_t num_rows = codes.size(0), num_codebooks = codebooks.size(0), num_entries = codebooks.size(1);
  const int64_t dim = codebooks.size(2);
  const c10::cuda::CUDAGuard device_guard(codes.device());
  at::Tensor out = at::empty({num_rows, dim}, codebooks.options());
  if (num_rows == 0) return out;

  const at::Tensor codes_c = codes.contiguous();
  // One device-to-host copy of (min, max): an out-of-range code would otherwise read outside the codebooks.
  const auto [lowest, highest] = at::aminmax(codes_c);
  const at::Tensor range = at::stack({lowest, highest}).cpu();
  const int64_t low = range[0].item<int64_t>(), high = range[1].item<int64_t>();
  TORCH_CHECK(low >= 0 && high < num_entries, "codes must be in [0, ", num_entries, "), got values in [", low, ", ",
              high, "]");
  if (dim == 0) return out;

  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t blocks = std::min<int64_t>(ceil_div(num_rows * dim, kThreads), 32LL * props->multiProcessorCount);
  rvq_decode_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      codes_c.data_ptr<int64_t>(), codebooks.data_ptr<float>(), out.data_ptr<float>(), num_rows,
      static_cast<int>(num_codebooks), num_entries, dim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace rvq
}  // namespace mmdkernels

TORCH_LIBRARY_IMPL(mmdkernels, CUDA, m) {
  m.impl("rvq_encode", &mmdkernels::rvq::rvq_encode_cuda);
  m.impl("rvq_decode", &mmdkernels::rvq::rvq_decode_cuda);
}
