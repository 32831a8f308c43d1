"""The "sdpa" backend: torch.nn.functional.scaled_dot_product_attention on the cache sliced to each length.

Slicing (a view, no copy) rather than a boolean mask: with a mask, SDPA still multiplies the masked entries' zero
weights by V, so NaN garbage beyond the length would leak into the output. Sequences of equal length share one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_attention_sdpa(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: list[int], scale: float
) -> torch.Tensor:
    """q [B, H, Dh], caches [B, H_kv, S_max, Dh], lengths: B Python ints -> [B, H, Dh] in q's dtype."""
    grouped = k_cache.shape[1] != q.shape[1]
    outputs = []
    start = 0
    while start < len(lengths):
        stop = start + 1
        while stop < len(lengths) and lengths[stop] == lengths[start]:
            stop += 1
        length = lengths[start]
        out = F.scaled_dot_product_attention(
            q[start:stop, :, None],
            k_cache[start:stop, :, :length],
            v_cache[start:stop, :, :length],
            scale=scale,
            enable_gqa=grouped,
        )
        outputs.append(out[:, :, 0])
        start = stop
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
