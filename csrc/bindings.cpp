// Every schema of the mmdkernels op library, in one place. Implementations register per dispatch key:
// CPU in csrc/<op>/<op>_cpu.cpp, CUDA in csrc/<op>/<op>_cuda.cu (a separate extension, loaded lazily).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mmdkernels, m) {
  // Shuffle-estimator MMD sums over codebook groups and bandwidths (spec: mmdkernels/mmd/reference.py,
  // shuffle_sums_ref). z: float32 [N, K, D]; perms: int64 [K, N]; groups: int32 [G, K] 0/1;
  // (coefs, chain_src, chain_step, chain_base): the bandwidth plan (mmdkernels/mmd/plan.py);
  // term_weights: [w_xx, w_yy, w_xy]. Returns (loss float32 [], grad float32 [N, K, D] or [0] if not compute_grad).
  m.def(
      "mmd_shuffle(Tensor z, Tensor perms, Tensor groups, float[] coefs, int[] chain_src, int[] chain_step, "
      "float chain_base, float[] term_weights, bool compute_grad) -> (Tensor, Tensor)");
  // dHSIC V-statistic summed over codebook groups and bandwidths (spec: dhsic_ref). Same conventions.
  m.def(
      "mmd_dhsic(Tensor z, Tensor groups, float[] coefs, int[] chain_src, int[] chain_step, float chain_base, "
      "bool compute_grad) -> (Tensor, Tensor)");
  // Fused residual VQ (contract: docs/rvq_kernels.md, spec: mmdkernels/rvq/reference.py). x: float32 [N, D];
  // codebooks: float32 [K, C, D]; sqnorms: float32 [K, C]. Returns (codes int64 [N, K], quantized [N, K, D] or [0]).
  m.def("rvq_encode(Tensor x, Tensor codebooks, Tensor sqnorms, bool return_quantized) -> (Tensor, Tensor)");
  // Fused gather-sum: codes int64 [N, K], codebooks float32 [K, C, D] -> float32 [N, D].
  m.def("rvq_decode(Tensor codes, Tensor codebooks) -> Tensor");
  // Test hook: the tile header's bandwidth chain on CPU. d: float32 [M] -> [M, A], e[m, j] = exp(-coefs[j] d[m]).
  m.def("bandwidth_chain_eval(Tensor d, float[] coefs, int[] chain_src, int[] chain_step, float chain_base) -> Tensor");
}

// A Python module named _C so that `import mmdkernels._C` loads the library and runs the registrations above.
static struct PyModuleDef mmdkernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mmdkernels_module); }
