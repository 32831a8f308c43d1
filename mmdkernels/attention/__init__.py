"""KV-cached decode attention: one query token per sequence against a static, preallocated cache."""

from __future__ import annotations

import functools
import math

import torch

from mmdkernels._dispatch import checking_values, choose_backend
from mmdkernels.attention import ops
from mmdkernels.attention.reference import decode_attention_ref, lengths_tensor
from mmdkernels.attention.sdpa import decode_attention_sdpa

__all__ = ["decode_attention", "decode_attention_ref"]


def _check_inputs(q, k_cache, v_cache, lengths, scale) -> None:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor of shape [B, H, Dh], got {type(q).__name__}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating tensor [B, H, Dh], got {q.dtype}")
    if q.dim() != 3 or min(q.shape) < 1:
        raise ValueError(f"q must have shape [B, H, Dh] with B, H, Dh >= 1, got shape {tuple(q.shape)}")
    batch, heads, head_dim = q.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(cache, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B, H_kv, S_max, Dh], got {type(cache).__name__}")
        if cache.dtype != q.dtype and not (q.dtype == torch.float32 and cache.dtype in REDUCED_CACHE_DTYPES):
            raise TypeError(
                f"{name} must have q's dtype {q.dtype} (or bfloat16 / float16 under a float32 q), got {cache.dtype}"
            )
        if cache.device != q.device:
            raise ValueError(f"{name} is on {cache.device} but q is on {q.device}: they must match")
        if cache.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H_kv, S_max, Dh] (4 dims), got shape {tuple(cache.shape)}")
        if cache.shape[0] != batch or cache.shape[3] != head_dim or cache.shape[2] < 1:
            raise ValueError(
                f"{name} must have shape [B={batch}, H_kv, S_max >= 1, Dh={head_dim}], got shape {tuple(cache.shape)}"
            )
        if cache.shape[1] < 1 or heads % cache.shape[1] != 0:
            raise ValueError(f"{name} must have H_kv heads dividing H = {heads}, got shape {tuple(cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache must have k_cache's dtype {k_cache.dtype}, got {v_cache.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got shape {tuple(v_cache.shape)}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    _check_lengths(lengths, batch, k_cache.shape[2], q.device)


def _check_lengths(lengths, batch: int, max_len: int, device: torch.device) -> None:
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype != torch.int64:
            raise TypeError(f"lengths must be an int or an int64 tensor [B], got dtype {lengths.dtype}")
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape [B] = ({batch},), got shape {tuple(lengths.shape)}")
        if lengths.device != device:
            raise ValueError(f"lengths is on {lengths.device} but q is on {device}: they must match")
        # The values are not read while tracing (they are data) nor on an accelerator (reading them would wait for
        # it on every decode step); the kernels clamp them to [0, S_max], so they never read outside the cache.
        if not checking_values() or lengths.device.type != "cpu":
            return
        low, high = int(lengths.min()), int(lengths.max())
    elif isinstance(lengths, int) and not isinstance(lengths, bool):
        low = high = lengths
    else:
        raise TypeError(f"lengths must be an int or an int64 tensor [B], got {type(lengths).__name__}")
    _check_length_range(low, high, max_len)


def _check_length_range(low: int, high: int, max_len: int) -> None:
    if low < 1 or high > max_len:
        raise ValueError(f"lengths must be in [1, S_max = {max_len}], got values in [{low}, {high}]")


CUDA_MAX_HEAD_SIZE = 256  # csrc/attention/attention_cuda.cu kMaxDim: 8 features per lane at most
# Cache dtypes a float32 q may attend over (a reduced-precision cache: half the bytes per step). The C++ CPU kernel,
# Triton's and the reference read them as float32; SDPA (which would copy the cache every call) and the CUDA kernel
# (one dtype throughout) take caches of q's dtype only.
REDUCED_CACHE_DTYPES = (torch.bfloat16, torch.float16)


def _op_reasons(q: torch.Tensor, k_cache: torch.Tensor, lengths, backend: str) -> list[str]:
    if backend in ("sdpa", "cuda") and k_cache.dtype != q.dtype:
        return [f"k_cache / v_cache must have q's dtype {q.dtype} for {backend}, got {k_cache.dtype}"]
    # SDPA needs the lengths as Python ints: not while tracing a tensor of them (the custom ops take it as it is)
    if backend == "sdpa" and isinstance(lengths, torch.Tensor) and torch.compiler.is_compiling():
        return ["lengths is a traced tensor: SDPA needs them as Python ints (the compiled kernels take the tensor)"]
    if backend == "cuda" and q.shape[2] > CUDA_MAX_HEAD_SIZE:
        return [f"q must have head size Dh in [1, {CUDA_MAX_HEAD_SIZE}] for the CUDA kernel, got {q.shape[2]}"]
    return []


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: int | torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over the first `lengths` entries of a static KV cache.

    out[b, h] = softmax(scale * q[b, h] . k_cache[b, g, :L_b]^T) v_cache[b, g, :L_b] with g = h // (H / H_kv)
    (grouped-query attention when H_kv < H). Entries at positions >= L_b are never read as valid (garbage or NaN
    there does not matter). Accumulates in float32.

    Args:
        q: [B, H, Dh] float32/bfloat16/float16 (float64: reference only).
        k_cache, v_cache: [B, H_kv, S_max, Dh] on q's device, any strides (views of a bigger buffer work); q's
            dtype, or bfloat16 / float16 under a float32 q (a reduced-precision cache, half the bytes a step reads:
            the "cpp", "triton" and "reference" backends; docs/decoding.md states its quality).
        lengths: int, or int64 tensor [B] on q's device: valid cache entries per sequence, 1 <= L_b <= S_max.
        scale: score scale, default 1/sqrt(Dh).
        backend: "cpp", "cuda", "triton", "sdpa" (torch's scaled_dot_product_attention) or "reference";
            None picks the fastest measured for the device and dtype (mmdkernels/_dispatch.py,
            docs/attention_kernels.md); the environment can force one, as for every op.
    Returns:
        [B, H, Dh] in q's dtype.

    Example:
        >>> k_cache[:, :, pos], v_cache[:, :, pos] = k, v  # [B, H, S_max, Dh] buffers, written in place
        >>> out = mmdkernels.decode_attention(q, k_cache, v_cache, pos + 1)  # q [B, H, Dh]
    """
    _check_inputs(q, k_cache, v_cache, lengths, scale)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    reasons = functools.partial(_op_reasons, q, k_cache, lengths)
    backend = choose_backend(q, backend, "decode_attention", op_reasons=reasons)
    if backend == "reference":
        return decode_attention_ref(q, k_cache, v_cache, lengths, scale=scale)
    if backend == "sdpa":
        per_sequence = lengths.tolist() if isinstance(lengths, torch.Tensor) else [lengths] * q.shape[0]
        _check_length_range(min(per_sequence), max(per_sequence), k_cache.shape[2])  # read now in any case
        return decode_attention_sdpa(q, k_cache, v_cache, per_sequence, scale)
    lengths = lengths_tensor(lengths, q.shape[0], q.device)
    return ops.decode_attention_op(backend)(q, k_cache, v_cache, lengths, scale)
