"""Plain-PyTorch KV-cached decode attention: the spec every kernel is tested against.

One query token per (sequence, head) attends to the first `lengths[b]` entries of a static cache:
    out[b, h] = softmax(scale * q[b, h] . k[b, g, :L_b]^T) v[b, g, :L_b],   g = h // (H / H_kv)  (grouped-query).
Cache entries at positions >= L_b are never used, whatever they hold (NaN included). Computed in float64 when the
inputs are float64, else in float32; returned in q's dtype.
"""

from __future__ import annotations

import math

import torch


def lengths_tensor(lengths: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """lengths as an int64 tensor [B] on `device` (an int means the same length for every sequence)."""
    if isinstance(lengths, torch.Tensor):
        return lengths.to(device=device, dtype=torch.int64)
    return torch.full((batch,), int(lengths), dtype=torch.int64, device=device)


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: int | torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Masked softmax(q k^T * scale) v for one query token against a static KV cache.

    Args:
        q: [B, H, Dh].
        k_cache, v_cache: [B, H_kv, S_max, Dh] with H_kv dividing H (any strides).
        lengths: int or int64 [B]; sequence b attends to cache positions < lengths[b].
        scale: score scale, default 1/sqrt(Dh).
    Returns:
        [B, H, Dh] in q's dtype.
    """
    batch, heads, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = heads // kv_heads
    k = k_cache.to(compute).repeat_interleave(group, dim=1)  # [B, H, S, Dh]
    v = v_cache.to(compute).repeat_interleave(group, dim=1)
    valid = torch.arange(max_len, device=q.device)[None, :] < lengths_tensor(lengths, batch, q.device)[:, None]
    valid = valid[:, None, :, None]  # [B, 1, S, 1]
    # Zero the invalid entries first: a masked score of -inf gives weight 0, but 0 * NaN garbage would still be NaN.
    k = torch.where(valid, k, 0.0)
    v = torch.where(valid, v, 0.0)
    scores = torch.einsum("bhd,bhsd->bhs", q.to(compute), k) * scale
    scores = scores.masked_fill(~valid[..., 0], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhs,bhsd->bhd", weights, v).to(q.dtype)
