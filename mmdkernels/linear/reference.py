"""decode_linear_ref: the spec of the few-row decode-step linear, plain PyTorch (float64-capable)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, activation: str | None = None
) -> torch.Tensor:
    """activation(x @ weight.T + bias), computed in x's dtype.

    Args:
        x: [..., D] floating.
        weight: [N, D], x's dtype and device.
        bias: [N] or None.
        activation: None or "gelu" (exact, erf-based).
    Returns:
        [..., N] in x's dtype.
    """
    y = torch.matmul(x, weight.transpose(0, 1))
    if bias is not None:
        y = y + bias
    return F.gelu(y) if activation == "gelu" else y
