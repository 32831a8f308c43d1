// The three float32 GEMM providers behind gemm.h and the ops that expose them to Python. "mkl": the Fortran sgemm_
// torch's CPU library exports (MKL in x86 wheels), called with the operands' own leading dimensions, so strided rows
// and transposed views are read in place; inside at::parallel_for it runs single-threaded. "onednn": torch's bundled
// oneDNN matmul (brgemm kernels) through at::native::mkldnn_matmul, which torch exports without a header; it also
// runs single-threaded inside a parallel region (oneDNN checks omp_in_parallel) and copies an operand to
// contiguous unless it is row-major or a transposed row-major view. "own": packed_gemm.h, any strides read in place,
// the columns of C split among torch's threads outside a parallel region, single-threaded inside one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <climits>

#include "common/checks.h"
#include "gemm/gemm.h"
#include "gemm/packed_gemm.h"

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace at {
namespace native {
// aten/src/ATen/native/mkldnn/Matmul.h (not shipped): result = beta * result + alpha * mat1 @ mat2. Weak, so a torch
// build without it still loads this library and reports oneDNN unavailable.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha)
    __attribute__((weak));
}  // namespace native
}  // namespace at

namespace mmdkernels {
namespace gemm {
namespace {

// A 2-D operand as BLAS sees it: element (i, j) at data[i * ld + j] (row-major) or data[j * ld + i] (transposed).
struct Operand {
  const float* data;
  bool transposed;
  int64_t ld;
};

// The operand's layout, or nullopt when it has no unit stride with a valid leading dimension (then it is copied).
c10::optional<Operand> operand_of(const at::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 || cols == 1) {
    const int64_t ld = rows == 1 ? std::max<int64_t>(cols, 1) : t.stride(0);
    if (ld >= std::max<int64_t>(cols, 1)) return Operand{t.data_ptr<float>(), false, ld};
  }
  if (t.stride(0) == 1 || rows == 1) {
    const int64_t ld = cols == 1 ? std::max<int64_t>(rows, 1) : t.stride(1);
    if (ld >= std::max<int64_t>(rows, 1)) return Operand{t.data_ptr<float>(), true, ld};
  }
  return c10::nullopt;
}

bool fits_int(int64_t v) { return v <= INT_MAX; }

// Row-major out = a @ b is, column-major, out^T = b^T @ a^T: BLAS gets b first, each flagged by its layout.
void mkl_mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const auto oa = operand_of(a), ob = operand_of(b);
  const int64_t m = a.size(0), n = b.size(1), k = a.size(1), ldc = out.size(0) == 1 ? std::max<int64_t>(n, 1)
                                                                                      : out.stride(0);
  if (sgemm_ == nullptr || !oa || !ob || !fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(oa->ld) ||
      !fits_int(ob->ld) || !fits_int(ldc)) {
    at::mm_out(const_cast<at::Tensor&>(out), a, b);
    return;
  }
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int lda = static_cast<int>(ob->ld), ldb = static_cast<int>(oa->ld), ldo = static_cast<int>(ldc);
  const float one = 1.0f, zero = 0.0f;
  sgemm_(ob->transposed ? "T" : "N", oa->transposed ? "T" : "N", &im, &in, &ik, &one, ob->data, &lda, oa->data, &ldb,
         &zero, out.data_ptr<float>(), &ldo);
}

// out = alpha a @ b + beta out. Columns go to threads in whole panels, so every element is summed in the same order
// whatever the thread count.
void own_mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float alpha, float beta) {
  const int64_t m = a.size(0), n = b.size(1), k = a.size(1), ldc = out.size(0) == 1 ? n : out.stride(0);
  const packed::Matrix ma{a.data_ptr<float>(), a.stride(0), a.stride(1)};
  const packed::Matrix mb{b.data_ptr<float>(), b.stride(0), b.stride(1)};
  float* c = out.data_ptr<float>();
  const int64_t panels = (n + packed::kNr - 1) / packed::kNr;
  // a thread's share must pay for packing its own copy of A: at least ~4 panels of columns each
  at::parallel_for(0, panels, 4, [&](int64_t begin, int64_t end) {
    thread_local packed::Workspace work;
    const int64_t j0 = begin * packed::kNr, j1 = std::min(n, end * packed::kNr);
    const packed::Matrix shifted{mb.data + j0 * mb.col_stride, mb.row_stride, mb.col_stride};
    packed::gemm(c + j0, ldc, ma, shifted, m, j1 - j0, k, alpha, beta, work);
  });
}

void onednn_mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(onednn_available(), "MMDKERNELS_GEMM: the onednn provider is unavailable (torch built without oneDNN, "
              "disabled by torch.backends.mkldnn, or its float32 matmul refuses this CPU: torch's mkldnn_matmul "
              "needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT); use mkl or auto");
  if (out.is_contiguous()) {
    at::native::mkldnn_matmul(a, b, out, 0.0f, 1.0f);
    return;
  }
  auto tmp = at::empty(out.sizes(), out.options());
  at::native::mkldnn_matmul(a, b, tmp, 0.0f, 1.0f);
  const_cast<at::Tensor&>(out).copy_(tmp);
}

void check_mm_args(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  MMD_CHECK_DEVICE(a, at::Device(at::kCPU));
  MMD_CHECK_DTYPE(a, at::kFloat);
  MMD_CHECK_DIM(a, 2);
  MMD_CHECK_DTYPE(b, at::kFloat);
  MMD_CHECK_DIM(b, 2);
  MMD_CHECK_DEVICE(b, at::Device(at::kCPU));
  TORCH_CHECK(a.size(1) == b.size(0), "gemm: a [M, K] and b [K, N] must share K, got a ", a.sizes(), " and b ",
              b.sizes());
  MMD_CHECK_DTYPE(out, at::kFloat);
  MMD_CHECK_SHAPE(out, a.size(0), b.size(1));
  TORCH_CHECK(out.stride(1) == 1 || out.size(1) <= 1, "gemm: out must have unit column stride, got strides ",
              out.strides());
}

}  // namespace

namespace {

// torch's mkldnn_matmul rejects every dtype, float32 included, on a CPU without AVX-512 BW/VL/DQ or AVX-NE-CONVERT
// (it was written for its bf16 path): one tiny product, once per process, says whether it runs here.
bool onednn_runs_here() {
  static const bool runs = [] {
    try {
      auto a = at::ones({2, 2}, at::kFloat), out = at::empty({2, 2}, at::kFloat);
      at::native::mkldnn_matmul(a, a, out, 0.0f, 1.0f);
      return out.eq(2.0f).all().item<bool>();
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return runs;
}

}  // namespace

bool onednn_available() {
  return at::native::mkldnn_matmul != nullptr && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() &&
         onednn_runs_here();
}

namespace {

void run(Provider provider, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.numel() == 0) return;
  if (a.size(1) == 0) {
    const_cast<at::Tensor&>(out).zero_();
    return;
  }
  if (provider == Provider::kOnednn) {
    onednn_mm(out, a, b);
  } else if (provider == Provider::kOwn) {
    own_mm(out, a, b, 1.0f, 0.0f);
  } else {
    mkl_mm(out, a, b);
  }
}

}  // namespace

void multiply_into_with(Provider provider, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  check_mm_args(out, a, b);
  run(provider, out, a, b);
}

void multiply_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  check_mm_args(out, a, b);
  run(choose(out, a, b), out, a, b);
}

void accumulate_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float alpha) {
  check_mm_args(out, a, b);
  if (out.numel() == 0 || a.size(1) == 0) return;
  switch (choose(out, a, b)) {
    case Provider::kOwn:
      own_mm(out, a, b, alpha, 1.0f);
      return;
    case Provider::kMkl:  // MKL's GEMM accumulates in place (beta = 1)
      const_cast<at::Tensor&>(out).addmm_(a, b, /*beta=*/1.0, /*alpha=*/alpha);
      return;
    default: {  // oneDNN's matmul here has no beta: its product is added
      auto tmp = at::empty(out.sizes(), out.options());
      onednn_mm(tmp, a, b);
      const_cast<at::Tensor&>(out).add_(tmp, alpha);
    }
  }
}

at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  multiply_into(out, a, b);
  return out;
}

void matmul_nt(float* out, int64_t ldo, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m,
               int64_t n, int64_t k) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  multiply_into(at::from_blob(out, {m, n}, {ldo, 1}, options),
         at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, options),
         at::from_blob(const_cast<float*>(b), {k, n}, {1, ldb}, options));
}

namespace {

// Test and benchmark hook: a @ b on `provider` ("mkl", "onednn", "own"), or as the current mode decides ("").
at::Tensor gemm_mm_op(const at::Tensor& a, const at::Tensor& b, c10::string_view provider) {
  MMD_CHECK_DIM(a, 2);
  MMD_CHECK_DIM(b, 2);
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  if (provider.empty()) {
    multiply_into(out, a, b);
  } else {
    multiply_into_with(parse_provider(std::string(provider)), out, a, b);
  }
  return out;
}

void gemm_set_mode_op(c10::string_view mode) { set_mode(std::string(mode)); }
std::string gemm_mode_op() { return mode(); }
std::string gemm_choices_op() { return choices_json(); }
bool gemm_onednn_available_op() { return onednn_available(); }

}  // namespace
}  // namespace gemm
}  // namespace mmdkernels

TORCH_LIBRARY_IMPL(mmdkernels, CPU, m) { m.impl("gemm_mm", &mmdkernels::gemm::gemm_mm_op); }

// No tensor arguments: dispatched through CompositeExplicitAutograd (the kernel the dispatcher takes for them).
TORCH_LIBRARY_IMPL(mmdkernels, CompositeExplicitAutograd, m) {
  m.impl("gemm_set_mode", &mmdkernels::gemm::gemm_set_mode_op);
  m.impl("gemm_mode", &mmdkernels::gemm::gemm_mode_op);
  m.impl("gemm_choices", &mmdkernels::gemm::gemm_choices_op);
  m.impl("gemm_onednn_available", &mmdkernels::gemm::gemm_onednn_available_op);
}
