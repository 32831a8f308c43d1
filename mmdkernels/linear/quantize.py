"""Weights of the decode-step linear stored in reduced precision: bfloat16, float16, or int8 with a float32 scale per
output channel. A decode step streams every weight once, so storing them in 2 or 1 bytes halves or quarters its
memory floor; activations and the accumulation stay float32 (weight-only quantisation, as llama.cpp's CPU path).
On CPU take bf16 or int8 (the C++ kernel streams those; float16 weights fall back to a dequantised copy per call);
on CUDA all three stream as stored (the Triton kernel, mmdkernels/linear/triton_kernels.py).

    packed = pack_decode_weight(linear.weight, "int8")   # once, after training
    y = mmdkernels.decode_linear(h, packed, linear.bias)  # h [B, D], B <= 16: the C++ kernel on CPU, Triton on CUDA

The packed weight's meaning is its `dequantize()`: decode_linear_ref dequantises, then does the float maths, and the
kernel computes the same sums (int8: scale * sum_k x_k q_k, the scale applied once per output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
FLOAT_PRECISIONS = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # stored dtype -> precision, no scale
INT8_MAX = 127  # symmetric: codes in [-127, 127], so -q is a code whenever q is


@dataclass(frozen=True, eq=False)
class QuantizedLinearWeight:
    """A linear layer's weight [N, D] stored for decoding in reduced precision (build it with pack_decode_weight).

    Attributes:
        data: [N, D] contiguous, torch.bfloat16 (precision "bf16"), torch.float16 ("fp16") or torch.int8 ("int8").
        scale: float32 [N] for int8 (weight[n] = scale[n] * data[n]); None for bfloat16 and float16.
    """

    data: torch.Tensor
    scale: torch.Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.data, torch.Tensor) or self.data.dim() != 2:
            got = tuple(self.data.shape) if isinstance(self.data, torch.Tensor) else type(self.data).__name__
            raise ValueError(f"data must be a 2-d tensor [N, D], got {got}")
        if self.data.dtype in FLOAT_PRECISIONS:
            if self.scale is not None:
                kind = str(self.data.dtype).removeprefix("torch.")
                raise ValueError(f"scale must be None for {kind} data (only int8 data has a scale)")
        elif self.data.dtype == torch.int8:
            n = self.data.shape[0]
            if (
                not isinstance(self.scale, torch.Tensor)
                or self.scale.shape != (n,)
                or self.scale.dtype != torch.float32
            ):
                got = (
                    f"{self.scale.dtype} {tuple(self.scale.shape)}"
                    if isinstance(self.scale, torch.Tensor)
                    else self.scale
                )
                raise ValueError(f"scale must be a float32 tensor [N = {n}] for int8 data, got {got}")
            if self.scale.device != self.data.device:
                raise ValueError(f"scale must be on data's device {self.data.device}, got {self.scale.device}")
        else:
            raise TypeError(f"data must have dtype torch.bfloat16, torch.float16 or torch.int8, got {self.data.dtype}")

    @property
    def precision(self) -> str:
        """The stored precision: "bf16", "fp16" or "int8"."""
        return FLOAT_PRECISIONS.get(self.data.dtype, "int8")

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes a decode step streams: the data, plus the scales."""
        scale = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return self.data.numel() * self.data.element_size() + scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, D] it stands for, in `dtype`. Exact in float64, and in float32 for bfloat16 and float16 data;
        int8 in float32 rounds each product scale * q once."""
        weight = self.data.to(dtype)
        return weight if self.scale is None else weight * self.scale.to(dtype)[:, None]

    def to(self, device) -> QuantizedLinearWeight:
        """The same weight on another device."""
        return QuantizedLinearWeight(self.data.to(device), None if self.scale is None else self.scale.to(device))


def pack_decode_weight(weight: torch.Tensor, precision: str) -> torch.Tensor | QuantizedLinearWeight:
    """A linear layer's weight in the precision a decode step will stream it in.

    Args:
        weight: [N, D] floating (float32 usually; detached, it is not trained through).
        precision: "fp32" (returns weight as float32, contiguous: no copy when it already is), "bf16" or "fp16"
            (rounded to nearest even; fp16 keeps 3 more mantissa bits than bf16 but overflows past 65504: such a
            weight raises), or "int8" (per output channel, symmetric: scale[n] = max_k |weight[n, k]| / 127,
            data = round(weight / scale) in [-127, 127]; an all-zero row gets scale 1).
    Returns:
        What mmdkernels.decode_linear takes as its weight: a tensor for "fp32", a QuantizedLinearWeight otherwise.

    Example:
        >>> packed = pack_decode_weight(torch.randn(2048, 512), "int8")
        >>> packed.data.dtype, packed.scale.shape
        (torch.int8, torch.Size([2048]))
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        got = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a floating tensor [N, D], got {got}")
    weight = weight.detach()
    if precision == "fp32":
        return weight.to(torch.float32).contiguous()
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        data = weight.to(dtype).contiguous()
        if precision == "fp16" and bool((torch.isinf(data) & torch.isfinite(weight)).any()):
            top = torch.finfo(torch.float16).max
            raise ValueError(f"weight has entries beyond float16's range (|w| > {top:g}): pack it as bf16 or int8")
        return QuantizedLinearWeight(data)
    w32 = weight.to(torch.float32)
    amax = w32.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    data = torch.round(w32 / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8).contiguous()
    return QuantizedLinearWeight(data, scale.contiguous())
