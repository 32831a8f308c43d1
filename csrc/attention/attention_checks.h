// Argument checks of mmdkernels::decode_attention shared by the CPU and CUDA implementations (the Python layer has
// already checked; these guard direct callers of torch.ops.mmdkernels.decode_attention).
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"

namespace mmdkernels {
namespace attention {

// Dtypes, shapes and devices of q [B, H, Dh], k_cache/v_cache [B, H_kv, S_max, Dh] and lengths int64 [B]. The caches
// have q's dtype, or (reduced_cache: the CPU kernel) bfloat16 or float16 under a float32 q.
inline void check_decode_attention_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& lengths, bool reduced_cache = false) {
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "q must be float32, bfloat16 or float16, got ", q.scalar_type());
  MMD_CHECK_DIM(q, 3);
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  for (const auto* cache : {&k_cache, &v_cache}) {
    const char* name = cache == &k_cache ? "k_cache" : "v_cache";
    TORCH_CHECK(cache->device() == q.device(), name, " must be on ", q.device(), ", got ", cache->device());
    const bool reduced = reduced_cache && q.scalar_type() == at::kFloat &&
                         (cache->scalar_type() == at::kBFloat16 || cache->scalar_type() == at::kHalf);
    TORCH_CHECK(cache->scalar_type() == q.scalar_type() || reduced, name, " must have q's dtype ", q.scalar_type(),
                reduced_cache ? " (or bfloat16 / float16 under a float32 q)" : "", ", got ", cache->scalar_type());
    TORCH_CHECK(cache->dim() == 4 && cache->size(0) == batch && cache->size(3) == dim && cache->size(2) >= 1 &&
                    cache->size(1) >= 1 && heads % cache->size(1) == 0,
                name, " must have shape [B=", batch, ", H_kv dividing ", heads, ", S_max >= 1, Dh=", dim, "], got ",
                cache->sizes());
  }
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache must have k_cache's dtype ",
              k_cache.scalar_type(), ", got ", v_cache.scalar_type());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ", k_cache.sizes(), ", got ",
              v_cache.sizes());
  MMD_CHECK_DEVICE(lengths, q.device());
  MMD_CHECK_DTYPE(lengths, at::kLong);
  MMD_CHECK_SHAPE(lengths, batch);
}

}  // namespace attention
}  // namespace mmdkernels
