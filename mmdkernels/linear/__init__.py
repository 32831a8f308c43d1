"""Few-row linear layers of a KV-cached decode step: y = act(x @ weight.T + bias) where x holds at most 16 rows.
Weights float32, or stored in bfloat16 / float16 / int8 with per-output-channel scales (pack_decode_weight,
quantize.py).

A decode step multiplies a handful of rows by every weight matrix of the model once, so on a CPU it is bound by how
fast the weights stream from memory. torch's GEMM packs the weight panel on every call, which costs an extra pass
over the weights; the C++ kernel (csrc/linear/linear_cpu.cpp) reads each weight once where it lies. On CUDA,
cuBLAS's GEMV kernels already stream float32 weights once, so the op is F.linear there (benchmarks/bench_linear.py);
packed weights go through the Triton kernel (triton_kernels.py), which reads them as stored, or the CUDA kernel
(csrc/linear/linear_cuda.cu) on request.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmdkernels._dispatch import LINEAR_MAX_ROWS, choose_backend
from mmdkernels.linear import ops
from mmdkernels.linear.quantize import PRECISIONS, QuantizedLinearWeight, pack_decode_weight
from mmdkernels.linear.reference import decode_linear_ref

__all__ = [
    "decode_linear",
    "decode_linear_ref",
    "pack_decode_weight",
    "QuantizedLinearWeight",
    "PRECISIONS",
    "MAX_ROWS",
]

MAX_ROWS = LINEAR_MAX_ROWS  # the C++ kernel's row limit
ACTIVATIONS = (None, "gelu")


def _check_inputs(x, weight, bias, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        got = f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating tensor [..., D], got {got}")
    quantized = isinstance(weight, QuantizedLinearWeight)
    if (
        not isinstance(weight, (torch.Tensor, QuantizedLinearWeight))
        or len(weight.shape) != 2
        or weight.shape[1] != x.shape[-1]
    ):
        got = (
            tuple(weight.shape) if isinstance(weight, (torch.Tensor, QuantizedLinearWeight)) else type(weight).__name__
        )
        raise ValueError(f"weight must have shape [N, D = {x.shape[-1]}] (x's last dim), got {got}")
    if quantized and weight.device != x.device:
        raise TypeError(f"weight must be on x's device {x.device}, got a {weight.precision} weight on {weight.device}")
    if not quantized and (weight.dtype != x.dtype or weight.device != x.device):
        expected, got = f"{x.dtype}, {x.device}", f"{weight.dtype}, {weight.device}"
        raise TypeError(f"weight must have x's dtype and device ({expected}), got {got}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must have shape [N = {weight.shape[0]}] or be None, got {got}")
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
        raise TypeError(f"bias must have x's dtype and device ({x.dtype}, {x.device}), got {bias.dtype}, {bias.device}")


def _kernel_reasons(x: torch.Tensor, weight, bias: torch.Tensor | None, backend: str) -> list[str]:
    """Why `backend` cannot run (x, weight, bias), beyond the general reasons of the dispatcher."""
    if backend not in ("cpp", "triton", "cuda"):
        return []
    quantized = isinstance(weight, QuantizedLinearWeight)
    reasons = []
    if x.dtype != torch.float32:
        what = "activations" if quantized else "dtype"
        reasons.append(f"{what} {x.dtype}: the kernel takes float32")
    rows = x.numel() // max(1, x.shape[-1])
    if rows > MAX_ROWS:
        reasons.append(f"{rows} rows: the kernel takes at most {MAX_ROWS}")
    data = weight.data if quantized else weight
    if backend != "triton" and (not data.is_contiguous() or (bias is not None and not bias.is_contiguous())):
        reasons.append("weight or bias is not contiguous")
    if backend == "cpp" and quantized and data.dtype == torch.float16:
        reasons.append("float16 weights: the C++ kernel streams bfloat16 or int8 (on CPU pack as 'bf16')")
    if torch.is_grad_enabled() and (x.requires_grad or data.requires_grad or (bias is not None and bias.requires_grad)):
        reasons.append("autograd is recording: the kernel has no backward (use it under torch.no_grad)")
    return reasons


def _torch_linear(x, weight, bias, activation):
    if isinstance(weight, QuantizedLinearWeight):
        weight = weight.dequantize(x.dtype)  # a float copy of the weight per call: GEMMs (> 16 rows), fp16 on CPU
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y


def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor | QuantizedLinearWeight,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """activation(F.linear(x, weight, bias)) for the few rows of a decode step.

    Args:
        x: [..., D] floating; the C++ kernel serves float32 CPU inputs of 2 to MAX_ROWS = 16 rows in all.
        weight: [N, D], x's dtype and device; or a QuantizedLinearWeight on x's device (pack_decode_weight: bfloat16,
            float16, or int8 with per-output-channel float32 scales), whose kernels (float32 x, 1 to 16 rows: C++ on
            CPU for bfloat16 and int8, Triton or CUDA on a GPU for all three) widen the weights to float32 in
            registers and accumulate in float32 (on CPUs with AMX-BF16, from 5 rows, the C++ kernel runs AMX tiles
            on x split into three bfloat16 parts that carry its float32 value, accumulating in float32; int8 weights
            on AMX-INT8 tiles at every row count, x as four 8-bit digits on a grid of 2^-30 of its row's largest
            element, summed exactly in int32; MMDKERNELS_LINEAR_AMX=0 turns both off, ops.tile_paths() says which
            run); elsewhere "torch" dequantises the weight to x's dtype, then F.linear.
        bias: [N] or None, x's dtype.
        activation: None or "gelu" (exact, erf-based, as F.gelu), applied in the kernel's epilogue.
        backend: None (the C++ kernel where it can run and measured faster, for packed weights on CUDA the Triton
            kernel; F.linear otherwise: float32 weights on CUDA, other dtypes, one row or more than 16, autograd),
            "cpp", "triton" or "cuda" (packed weights only; each raises with the reasons where it cannot run),
            "torch" (F.linear) or "reference" (decode_linear_ref); the environment can force one
            (mmdkernels/_dispatch.py).
    Returns:
        [..., N] in x's dtype. The kernel sums in float32 in another order than torch's GEMM: results agree to
        float32 rounding, not bit for bit. With a quantized weight the spec is decode_linear_ref (dequantise, then
        the float maths); the quantisation error itself is the weight's, not the kernel's.

    Example:
        >>> y = mmdkernels.decode_linear(h, fc1.weight, fc1.bias, activation="gelu")  # h [B, D], B <= 16
        >>> packed = pack_decode_weight(fc1.weight, "bf16")  # once
        >>> y = mmdkernels.decode_linear(h, packed, fc1.bias, activation="gelu")
    """
    _check_inputs(x, weight, bias, activation)
    quantized = isinstance(weight, QuantizedLinearWeight)
    backend = choose_backend(
        x,
        backend,
        "decode_linear_quantized" if quantized else "decode_linear",
        op_reasons=lambda name: _kernel_reasons(x, weight, bias, name),
    )
    if backend == "torch":
        return _torch_linear(x, weight, bias, activation)
    if backend == "reference":
        return decode_linear_ref(x, weight, bias, activation=activation)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if quantized:
        op = ops.small_batch_linear_quantized_op(backend)
        y = op(rows, weight.data, weight.scale, bias, activation == "gelu")
    else:
        y = ops.small_batch_linear_op()(rows, weight, bias, activation == "gelu")
    return y.view(*x.shape[:-1], weight.shape[0])
