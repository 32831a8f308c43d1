"""The GEMM inside the C++ CPU kernels (csrc/gemm/gemm.h): which provider runs, and a hook to run each one.

The CPU kernels (RVQ encode score tiles, MMD distance and gradient tiles) do their float32 products through one
chooser: "mkl" (the BLAS torch's CPU library ships), "onednn" (torch's bundled oneDNN) or "own" (packed panels and a
register-blocked micro-kernel of ours, csrc/gemm/packed_gemm.h). In "auto" mode (default) the first call of each shape
class (M, N, K bucketed to powers of two, operand layouts, threads available) times every available provider on that
shape and keeps the fastest for the process (another than MKL only when more than 10 % ahead: on a busy machine where
they are level, noise would otherwise flip the choice); ``MMDKERNELS_GEMM=mkl|onednn|own|auto`` (read at the first
product) or :func:`set_gemm_path` forces one.

    import mmdkernels
    mmdkernels.rvq_encode(x, codebooks)
    print(mmdkernels.gemm_path())   # {"mode": "auto", "choices": [{"m": 512, ..., "chosen": "mkl", "gflops": ...}]}
"""

from __future__ import annotations

import contextlib
import json
import os

import torch

from mmdkernels import _ext

GEMM_ENV = "MMDKERNELS_GEMM"
GEMM_PATHS = ("auto", "mkl", "onednn", "own")
PROVIDERS = ("mkl", "onednn", "own")


def check_gemm_path(path: str, source: str = GEMM_ENV) -> str:
    """`path` if it is one of GEMM_PATHS, else ValueError naming `source` and the allowed values."""
    if path not in GEMM_PATHS:
        raise ValueError(f"{source}={path!r}: expected one of {', '.join(GEMM_PATHS)}")
    return path


def _ops():
    """torch.ops.mmdkernels after loading the CPU library; validates MMDKERNELS_GEMM first for a clear error."""
    env = os.environ.get(GEMM_ENV, "")
    if env:
        check_gemm_path(env)
    _ext.compiled_op("gemm_mode", "cpp")  # loads the CPU library, or raises with the reason it cannot
    return torch.ops.mmdkernels


def gemm_path() -> dict:
    """What the CPU kernels' GEMM runs on in this process.

    Returns:
        {"mode": "auto" | "mkl" | "onednn" | "own", "onednn_available": bool, "choices": [...]}, where each choice
        is one measured shape class: {"m", "n", "k" (the shape timed), "layout" ("nt": a row-major, b transposed
        view, ...), "threads" (1 inside a parallel region), "chosen": "mkl" | "onednn" | "own", "gflops": {"mkl": x,
        "onednn": y, "own": z}}.
        Empty choices until a kernel has run (or in a forced mode, which measures nothing).
    """
    ops = _ops()
    return {
        "mode": ops.gemm_mode(),
        "onednn_available": ops.gemm_onednn_available(),
        "choices": json.loads(ops.gemm_choices()),
    }


def set_gemm_path(path: str) -> None:
    """Force the CPU kernels' GEMM provider for this process: "mkl", "onednn", "own", or "auto" (measure per shape
    class)."""
    check_gemm_path(path, source="path")
    _ops().gemm_set_mode(path)


@contextlib.contextmanager
def forced_gemm_path(path: str):
    """Run a block with the CPU kernels' GEMM on `path`, restoring the previous mode after."""
    previous = _ops().gemm_mode()
    set_gemm_path(path)
    try:
        yield
    finally:
        set_gemm_path(previous)


def gemm_mm(a: torch.Tensor, b: torch.Tensor, provider: str | None = None) -> torch.Tensor:
    """a @ b through the kernels' GEMM: on `provider` ("mkl", "onednn", "own"), or as the current mode chooses (None).

    Args:
        a: float32 CPU [M, K], row-major or a transposed view (one unit stride, any leading dimension).
        b: float32 CPU [K, N], the same; a @ b^T is ``gemm_mm(a, b.t())``.
    Returns:
        float32 [M, N], contiguous.
    """
    if provider is not None and provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS} or None, got {provider!r}")
    return _ops().gemm_mm(a, b, provider or "")
