"""Few-row linear layers of a KV-cached decode step: y = act(x @ weight.T + bias) where x holds at most 16 rows.

A decode step multiplies a handful of rows by every weight matrix of the model once, so on a CPU it is bound by how
fast the weights stream from memory. torch's GEMM packs the weight panel on every call, which costs an extra pass
over the weights; the C++ kernel (csrc/linear/linear_cpu.cpp) reads each weight once where it lies. On CUDA,
cuBLAS's GEMV kernels already stream the weights once, so the op is F.linear there (benchmarks/bench_linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmdkernels import _ext

__all__ = ["decode_linear", "MAX_ROWS"]

MAX_ROWS = 16  # the C++ kernel keeps all rows' accumulators in registers; larger batches are GEMMs
BACKENDS = ("auto", "cpp", "torch")
ACTIVATIONS = (None, "gelu")


def _small_batch_linear_fake(x, weight, bias, gelu):
    return x.new_empty(x.shape[0], weight.shape[0])


_ext.register_on_load("mmdkernels::small_batch_linear", _small_batch_linear_fake)


def _check_inputs(x, weight, bias, activation, backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        got = f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating tensor [..., D], got {got}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape [N, D = {x.shape[-1]}] (x's last dim), got {got}")
    if weight.dtype != x.dtype or weight.device != x.device:
        expected, got = f"{x.dtype}, {x.device}", f"{weight.dtype}, {weight.device}"
        raise TypeError(f"weight must have x's dtype and device ({expected}), got {got}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias must have shape [N = {weight.shape[0]}] or be None, got {got}")
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
        raise TypeError(f"bias must have x's dtype and device ({x.dtype}, {x.device}), got {bias.dtype}, {bias.device}")


def _kernel_reasons(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> list[str]:
    """Why the C++ kernel cannot run (x, weight) (empty list: it can)."""
    reasons = []
    if x.device.type != "cpu":
        reasons.append(f"x is on {x.device}: the kernel is CPU-only (cuBLAS serves CUDA)")
    if x.dtype != torch.float32:
        reasons.append(f"dtype {x.dtype}: the kernel takes float32")
    rows = x.numel() // max(1, x.shape[-1])
    if rows > MAX_ROWS:
        reasons.append(f"{rows} rows: the kernel takes at most {MAX_ROWS}")
    if not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        reasons.append("weight or bias is not contiguous")
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        reasons.append("autograd is recording: the kernel has no backward (use it under torch.no_grad)")
    if not _ext.available("cpu"):
        reasons.append(_ext.load_error("cpu"))
    return reasons


def _torch_linear(x, weight, bias, activation):
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y


def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """activation(F.linear(x, weight, bias)) for the few rows of a decode step.

    Args:
        x: [..., D] floating; the C++ kernel serves float32 CPU inputs of at most MAX_ROWS = 16 rows in all.
        weight: [N, D], x's dtype and device.
        bias: [N] or None.
        activation: None or "gelu" (exact, erf-based, as F.gelu), applied in the kernel's epilogue.
        backend: "auto" (the C++ kernel where it can run, F.linear otherwise: CUDA, other dtypes, more rows,
            autograd), "cpp" (raises with the reasons where it cannot run) or "torch" (F.linear).
    Returns:
        [..., N] in x's dtype. The kernel sums in float32 in another order than torch's GEMM: results agree to
        float32 rounding, not bit for bit.
    """
    _check_inputs(x, weight, bias, activation, backend)
    if backend == "torch":
        return _torch_linear(x, weight, bias, activation)
    reasons = _kernel_reasons(x, weight, bias)
    if backend == "auto" and x.numel() == x.shape[-1]:
        reasons.append("one row: torch's GEMV (no packing) measured as fast")
    if reasons:
        if backend == "cpp":
            raise RuntimeError("decode_linear backend='cpp' cannot run this input: " + "; ".join(reasons))
        return _torch_linear(x, weight, bias, activation)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.ops.mmdkernels.small_batch_linear(rows, weight, bias, activation == "gelu")
    return y.view(*x.shape[:-1], weight.shape[0])
