"""decode_linear_ref: the spec of the few-row decode-step linear, plain PyTorch (float64-capable)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmdkernels.linear.quantize import QuantizedLinearWeight


def decode_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor | QuantizedLinearWeight,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
) -> torch.Tensor:
    """activation(x @ weight.T + bias), computed in x's dtype.

    Args:
        x: [..., D] floating.
        weight: [N, D] in x's dtype and device, or a QuantizedLinearWeight (bf16, or int8 with per-output-channel
            scales; mmdkernels.linear.pack_decode_weight), which is dequantised to x's dtype first: in float64 the
            exact weight it stands for.
        bias: [N] or None.
        activation: None or "gelu" (exact, erf-based).
    Returns:
        [..., N] in x's dtype.

    Example:
        >>> y64 = decode_linear_ref(x.double(), pack_decode_weight(w, "int8"))  # the spec of the int8 kernel
    """
    if isinstance(weight, QuantizedLinearWeight):
        weight = weight.dequantize(x.dtype)
    y = torch.matmul(x, weight.transpose(0, 1))
    if bias is not None:
        y = y + bias
    return F.gelu(y) if activation == "gelu" else y
