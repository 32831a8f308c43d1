// The float32 GEMM inside the CPU kernels (RVQ score tiles, MMD distance and gradient tiles), run on the provider
// measured fastest on the running machine: "mkl" (the BLAS sgemm torch's CPU library exports, at::mm without it),
// "onednn" (torch's bundled oneDNN through at::native::mkldnn_matmul) or "own" (packed panels and a register-blocked
// micro-kernel of ours, packed_gemm.h). The first call of a shape class (M, N, K bucketed to powers of two, operand
// layout, threads available: 1 inside at::parallel_for, else torch's count) times every available provider on that
// shape in that context and caches the fastest (another than MKL only when >10% ahead of it) for the process.
// MMDKERNELS_GEMM=mkl|onednn|own|auto (read at the first call) or set_mode() forces one. Thread-safe; callable
// inside parallel regions.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace mmdkernels {
namespace gemm {

enum class Provider { kMkl, kOnednn, kOwn };

// out [M, N] = a [M, K] @ b [K, N]. a, b: float32 CPU 2-D, each either row-major or a transposed row-major view
// (one unit stride; any leading dimension), so a @ b^T is multiply_into(out, a, b.t()). out: float32 [M, N] with unit
// column stride (any row stride), not aliasing a or b. Runs the provider the current mode picks.
void multiply_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// out += alpha * a @ b on the provider the current mode picks (MKL and ours accumulate in place; oneDNN's product
// goes through a temporary). Arguments as multiply_into.
void accumulate_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float alpha);

// The same as multiply_into into a new contiguous [M, N] tensor.
at::Tensor product(const at::Tensor& a, const at::Tensor& b);

// Row-major raw form for callers inside parallel regions: out [m, n] (row stride ldo) = a [m, k] (row stride lda)
// @ b [n, k]^T (row stride ldb).
void matmul_nt(float* out, int64_t ldo, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m,
               int64_t n, int64_t k);

// multiply_into on one named provider, bypassing the choice (tests, benchmarks, the measurement itself).
void multiply_into_with(Provider provider, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// "auto", "mkl", "onednn" or "own"; set_mode raises naming MMDKERNELS_GEMM and the allowed values on anything else.
std::string mode();
void set_mode(const std::string& mode);

// The provider multiply_into would run for this problem now (measuring first if its shape class is new).
Provider choose(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// Every measured shape class as a JSON array: [{"m", "n", "k", "layout", "threads", "chosen", "gflops":
// {"mkl": x, "onednn": y, "own": z}}, ...] (the measured shape, not the bucket bounds; gflops 0 for an unavailable
// provider).
std::string choices_json();

const char* provider_name(Provider provider);
Provider parse_provider(const std::string& name);  // "mkl" / "onednn" / "own", else an error naming them
bool onednn_available();

}  // namespace gemm
}  // namespace mmdkernels
