// Every schema of the mmdkernels op library, in one place: MMD (shuffle, dHSIC and their row-range forms), RVQ
// encode/decode, sampling, decode attention, the few-row linear, the fused CPU decode step, the GEMM choice and two
// test hooks.
// Implementations register per dispatch key: CPU in csrc/<op>/<op>_cpu.cpp (this library, built once per x86 ISA as
// mmdkernels._C_<isa>, see setup.py), CUDA in csrc/<op>/<op>_cuda.cu (mmdkernels._C_cuda, loaded lazily after it).
// Triton ops are Python custom ops (mmdkernels/<op>/ops.py). Backend choice: mmdkernels/_dispatch.py only.
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
  // Row-range forms for the distributed loss (mmdkernels/mmd/distributed.py): only the entries (n, m) that the rows
  // row_begin <= n < row_end own (every column m; a symmetric plane's pairs of blocks once, docs/mmd_kernels.md).
  // mmd_shuffle_rows returns (partial loss float64 [], partial grad float32 [N, K, D] for all N samples).
  // mmd_dhsic_sums returns float64 [K*A + 1, N]: row k*A + j holds the sums of E_{k,j} over the owned pairs (summed
  // over a partition of the rows: the Gram row sums), the last row the joint sums (only its total is used).
  // mmd_dhsic_rows takes the sums of ALL rows and returns (loss float32 [], partial grad [N, K, D] or [0]).
  m.def(
      "mmd_shuffle_rows(Tensor z, Tensor perms, Tensor groups, float[] coefs, int[] chain_src, int[] chain_step, "
      "float chain_base, float[] term_weights, int row_begin, int row_end, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "mmd_dhsic_sums(Tensor z, Tensor groups, float[] coefs, int[] chain_src, int[] chain_step, float chain_base, "
      "int row_begin, int row_end) -> Tensor");
  m.def(
      "mmd_dhsic_rows(Tensor z, Tensor groups, float[] coefs, int[] chain_src, int[] chain_step, float chain_base, "
      "Tensor sums, int row_begin, int row_end, bool compute_grad) -> (Tensor, Tensor)");
  // The C++ dHSIC's measured distance-tile choices so far, as JSON (mmdkernels.mmd.ops.dhsic_tile_choices).
  m.def("mmd_dhsic_tile_choices() -> str");
  // Fused residual VQ (contract: docs/rvq_kernels.md, spec: mmdkernels/rvq/reference.py). x: float32 [N, D];
  // codebooks: float32 [K, C, D]; sqnorms: float32 [K, C]. Returns (codes int64 [N, K], quantized [N, K, D] or [0]).
  m.def("rvq_encode(Tensor x, Tensor codebooks, Tensor sqnorms, bool return_quantized) -> (Tensor, Tensor)");
  // Fused gather-sum: codes int64 [N, K], codebooks float32 [K, C, D] -> float32 [N, D].
  m.def("rvq_decode(Tensor codes, Tensor codebooks) -> Tensor");
  // KV-cached decode attention (spec: mmdkernels/attention/reference.py). q [B, H, Dh]; k_cache, v_cache
  // [B, H_kv, S_max, Dh] (q's dtype: float32/bfloat16/float16; any strides; H_kv divides H); lengths int64 [B]
  // (keys < lengths[b] are attended). Returns [B, H, Dh] in q's dtype, accumulated in float32.
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale) -> Tensor");
  // Fused multi-codebook sampling (contract: docs/sampling_kernels.md, spec: mmdkernels/sampling/reference.py).
  // logits: float32/bfloat16/float16 [N, K, V] contiguous, N = B (or 2B, conditional rows first, with use_cfg);
  // uniforms: float64 [B, K] in [0, 1); temperature 0 = greedy; top_k 0 = off; top_p 1 = off.
  // Returns int64 [B, K], -1 for a row with NaN/+inf logits or only -inf logits.
  m.def(
      "sample_tokens(Tensor logits, Tensor uniforms, float temperature, int top_k, float top_p, float cfg_coef, "
      "bool use_cfg) -> Tensor");
  // Few-row linear layer of a decode step (CPU only; spec: F.linear, then F.gelu when gelu): x float32 [M, D]
  // (M <= 16, unit stride in D), weight float32 [N, D] contiguous, bias float32 [N] or None -> float32 [M, N].
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias, bool gelu) -> Tensor");
  // The same with weights stored in reduced precision (spec: mmdkernels/linear/reference.py, decode_linear_ref on a
  // QuantizedLinearWeight): weight bfloat16 [N, D] (scale None) or int8 [N, D] with scale float32 [N]
  // (y = scale * (x @ weight^T) + bias); x, the accumulation and the result float32.
  m.def("small_batch_linear_quantized(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, bool gelu) -> Tensor");
  // The few-row linear's measured choice of weight-row blocking (csrc/linear/blocking.h), as JSON.
  m.def("linear_blocking_choices() -> str");
  // The AMX tile paths the few-row linear takes on this CPU now (csrc/linear/linear_amx*.h; MMDKERNELS_LINEAR_AMX=0
  // turns them off): "bf16" (bfloat16 weights from 5 rows, float32 from 13), "int8" (int8 weights at every row count).
  m.def("linear_tile_paths() -> str[]");
  // One KV-cached decode step through a stack of decoder layers (CPU; spec: mmdkernels/decode/reference.py,
  // decode_layers_ref). x float32 [B, D] (the step's embeddings, B <= 16); weights: 12 tensors per layer in the order
  // of DecoderLayerWeights, the projections float32, bfloat16 or int8 (the norms float32); scales: empty, or one entry
  // per weight: the float32 [N] scale of an int8 projection, None elsewhere; self_k/self_v [L, B, H, S_max, Dh]
  // written at `step`; cross_k/cross_v [L, B, H, Tc, Dh]; cross_lengths int64 [B]; torch_linear: project float32
  // weights through at::linear instead of small_batch_linear (the dispatcher's rule, mmdkernels/_dispatch.py; bf16
  // and int8 weights always take small_batch_linear_quantized). Returns the residual stream, float32 [B, D].
  m.def(
      "lm_decode_layers(Tensor x, Tensor[] weights, Tensor?[] scales, Tensor(a!) self_k, Tensor(b!) self_v, "
      "Tensor cross_k, Tensor cross_v, Tensor cross_lengths, int step, int num_heads, float eps, bool torch_linear) "
      "-> Tensor");
  // A whole decode step of the model, tokens to logits (CPU; spec: mmdkernels/decode/reference.py,
  // decode_logits_ref): x[b] = sum_r embedding[tokens[b, r] + offsets[r]] + position (tokens, offsets int64 [B, R],
  // [R]; embedding float32 [V, D]; position float32 [D]), then lm_decode_layers' layers, the final LayerNorm and the
  // heads: head [C, D] float32, bfloat16 or int8 (with head_scale float32 [C]). Returns float32 logits [B, C].
  m.def(
      "lm_decode_logits(Tensor tokens, Tensor position, Tensor embedding, Tensor offsets, Tensor final_norm_weight, "
      "Tensor final_norm_bias, Tensor head, Tensor? head_scale, Tensor[] weights, Tensor?[] scales, "
      "Tensor(a!) self_k, Tensor(b!) self_v, Tensor cross_k, Tensor cross_v, Tensor cross_lengths, int step, "
      "int num_heads, float eps, bool torch_linear) -> Tensor");
  // The GEMM inside the CPU kernels (csrc/gemm/gemm.h, mmdkernels/gemm.py). gemm_mm: float32 a [M, K] @ b [K, N]
  // (each row-major or a transposed view) -> [M, N] on provider "mkl" / "onednn" / "own", or "" for the current choice.
  // gemm_set_mode / gemm_mode: "auto" | "mkl" | "onednn" | "own" (MMDKERNELS_GEMM); gemm_choices: the measured shape
  // classes as JSON.
  m.def("gemm_mm(Tensor a, Tensor b, str provider) -> Tensor");
  m.def("gemm_set_mode(str mode) -> ()");
  m.def("gemm_mode() -> str");
  m.def("gemm_choices() -> str");
  m.def("gemm_onednn_available() -> bool");
  // Test hook: the tile header's bandwidth chain on CPU. d: float32 [M] -> [M, A], e[m, j] = exp(-coefs[j] d[m]).
  m.def("bandwidth_chain_eval(Tensor d, float[] coefs, int[] chain_src, int[] chain_step, float chain_base) -> Tensor");
  // Test hook: the symmetric planes' block-pair mapping of csrc/mmd/block_pairs.h (what the CUDA kernels run) on CPU.
  // row_blocks: int64 [R] -> int64 [R, 1 + num_blocks / 2], the column block of each step (0: diagonal), -1 past
  // the row block's owned blocks.
  m.def("symmetric_block_pairs(Tensor row_blocks, int num_blocks) -> Tensor");
}

// A Python module per CPU library, _C_<variant> (TORCH_EXTENSION_NAME, set by the build), so that importing it loads
// the library and runs the registrations above; its `cpu_variant` attribute names the instruction set it was built for.
#define MMDKERNELS_STR2(x) #x
#define MMDKERNELS_STR(x) MMDKERNELS_STR2(x)
#define MMDKERNELS_CAT2(a, b) a##b
#define MMDKERNELS_CAT(a, b) MMDKERNELS_CAT2(a, b)
static struct PyModuleDef mmdkernels_module = {
    PyModuleDef_HEAD_INIT, MMDKERNELS_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
PyMODINIT_FUNC MMDKERNELS_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* module = PyModule_Create(&mmdkernels_module);
  if (module != nullptr && PyModule_AddStringConstant(module, "cpu_variant", MMDKERNELS_STR(MMDKERNELS_CPU_VARIANT)) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
