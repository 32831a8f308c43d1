"""Few-row linear layers of a KV-cached decode step: y = x @ weight.T where x holds at most 16 rows.

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


def _small_batch_linear_fake(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


_ext.register_on_load("mmdkernels::small_batch_linear", _small_batch_linear_fake)


def _check_inputs(x, weight, bias, backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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


def _kernel_reasons(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    """Why the C++ kernel cannot run (x, weight) (empty list: it can)."""
    reasons = []
    if x.device.type != "cpu":
        reasons.append(f"x is on {x.device}: the kernel is CPU-only (cuBLAS serves CUDA)")
    if x.dtype != torch.float32:
        reasons.append(f"dtype {x.dtype}: the kernel takes float32")
    rows = x.numel() // max(1, x.shape[-1])
    if rows > MAX_ROWS:
        reasons.append(f"{rows} rows: the kernel takes at most {MAX_ROWS}")
    if not weight.is_contiguous():
        reasons.append("weight is not contiguous")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        reasons.append("autograd is recording: the kernel has no backward (use it under torch.no_grad)")
    if not _ext.available("cpu"):
        reasons.append(_ext.load_error("cpu"))
    return reasons


def decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """F.linear(x, weight, bias) for the few rows of a decode step.

    Args:
        x: [..., D] floating; the C++ kernel serves float32 CPU inputs of at most MAX_ROWS = 16 rows in all.
        weight: [N, D], x's dtype and device.
        bias: [N] or None.
        backend: "auto" (the C++ kernel where it can run, F.linear otherwise: CUDA, other dtypes, more rows,
            autograd), "cpp" (raises with the reasons where it cannot run) or "torch" (F.linear).
    Returns:
        [..., N] in x's dtype. The kernel sums in float32 in another order than torch's GEMM: results agree to
        float32 rounding, not bit for bit.
    """
    _check_inputs(x, weight, bias, backend)
    if backend == "torch":
        return F.linear(x, weight, bias)
    reasons = _kernel_reasons(x, weight)
    if backend == "auto" and x.numel() == x.shape[-1]:
        reasons.append("one row: torch's GEMV (no packing) measured as fast")
    if reasons:
        if backend == "cpp":
            raise RuntimeError("decode_linear backend='cpp' cannot run this input: " + "; ".join(reasons))
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.ops.mmdkernels.small_batch_linear(rows, weight)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])
