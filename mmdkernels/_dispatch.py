"""Backend choice: explicit `backend=`, else MMDKERNELS_BACKEND, else the best available for the tensor's device.

Each backend says why it cannot run an input (xformers-style `not_supported_reasons`); when an explicitly requested
backend cannot, the error lists its reasons; when automatic choice falls back to the reference, it warns once.
"""

from __future__ import annotations

import os

import torch

from mmdkernels import _ext

BACKENDS = ("reference", "cpp", "triton", "cuda")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PRIORITY = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}


def checking_values() -> bool:
    """Whether to run the data-dependent input checks (NaN/Inf, index ranges). Eagerly yes; inside torch.compile no:
    reading a value back would sync the device and break the graph (the compiled kernels still bound-check indices)."""
    return not torch.compiler.is_compiling()


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def not_supported_reasons(backend: str, x: torch.Tensor, max_codebooks: int | None = None) -> list[str]:
    """Why `backend` cannot run on input x (empty list: it can)."""
    reasons = []
    if backend == "reference":
        return reasons
    if x.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {x.dtype}: the fused kernels take float32/bfloat16/float16 (use backend='reference')")
    if max_codebooks is not None and x.shape[1] > max_codebooks:
        reasons.append(f"K = {x.shape[1]} codebooks: the fused kernels support at most {max_codebooks}")
    if backend == "cpp":
        if x.device.type != "cpu":
            reasons.append(f"input on {x.device}: the C++ kernel runs on CPU tensors")
        elif not _ext.available("cpu"):
            reasons.append(_ext.load_error("cpu"))
    elif backend == "cuda":
        if x.device.type != "cuda":
            reasons.append(f"input on {x.device}: the CUDA kernel runs on CUDA tensors")
        elif not _ext.available("cuda"):
            reasons.append(_ext.load_error("cuda"))
    elif backend == "triton":
        if not _ext.triton_installed():
            reasons.append("triton is not installed")
        elif x.device.type == "cpu" and not triton_interpreter_enabled():
            reasons.append("input on cpu: Triton runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1")
        elif x.device.type not in ("cpu", "cuda"):
            reasons.append(f"input on {x.device}: Triton runs on CUDA tensors")
    else:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return reasons


def choose_backend(x: torch.Tensor, requested: str | None, op: str, max_codebooks: int | None = None) -> str:
    """The backend that will run `op` on x."""
    requested = requested or os.environ.get("MMDKERNELS_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {requested!r}")
        reasons = not_supported_reasons(requested, x, max_codebooks)
        if reasons:
            raise RuntimeError(f"{op}: backend {requested!r} cannot run this input: " + "; ".join(reasons))
        return requested
    all_reasons = []
    for backend in _PRIORITY.get(x.device.type, ("reference",)):
        reasons = not_supported_reasons(backend, x, max_codebooks)
        if not reasons:
            if backend == "reference" and x.dtype in KERNEL_DTYPES and all_reasons:
                _ext.warn_once(
                    f"{op}-{x.device.type}",
                    f"{op}: no fused kernel available for {x.device.type} input, using the PyTorch reference "
                    f"(slower, O(N^2) memory). Reasons: " + "; ".join(all_reasons),
                )
            return backend
        all_reasons += [f"{backend}: {r}" for r in reasons]
    raise RuntimeError(f"{op}: no backend can run this input: " + "; ".join(all_reasons))
