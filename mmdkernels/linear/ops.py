"""The few-row linear ops and their fakes for torch.compile: compiled (`mmdkernels::small_batch_linear`, CPU;
`mmdkernels::small_batch_linear_quantized`, CPU csrc/linear/linear_cpu.cpp and CUDA csrc/linear/linear_cuda.cu by
dispatch key; schemas in csrc/bindings.cpp) and the Triton twin of the quantized one."""

from __future__ import annotations

import json
from typing import Optional

import torch

from mmdkernels import _ext


def _small_batch_linear_fake(x, weight, bias, gelu):
    return x.new_empty(x.shape[0], weight.shape[0])


def _small_batch_linear_quantized_fake(x, weight, scale, bias, gelu):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("mmdkernels::small_batch_linear_quantized_triton", mutates_args=())
def small_batch_linear_quantized_triton(
    x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], bias: Optional[torch.Tensor], gelu: bool
) -> torch.Tensor:
    from mmdkernels.linear import triton_kernels

    return triton_kernels.small_batch_linear_quantized_triton(x, weight, scale, bias, gelu)


small_batch_linear_quantized_triton.register_fake(_small_batch_linear_quantized_fake)
_ext.register_on_load("mmdkernels::small_batch_linear", _small_batch_linear_fake)
_ext.register_on_load("mmdkernels::small_batch_linear_quantized", _small_batch_linear_quantized_fake)


def small_batch_linear_op():
    """mmdkernels::small_batch_linear: (rows [M, D] float32, weight [N, D], bias [N] or None, gelu) -> [M, N]."""
    return _ext.compiled_op("small_batch_linear", "cpp")


def small_batch_linear_quantized_op(backend: str = "cpp"):
    """The packed-weight op for backend "cpp", "cuda" or "triton": (rows [M, D] float32, weight [N, D] bfloat16 /
    int8 (CPU) or bfloat16 / float16 / int8 (CUDA, Triton), scale float32 [N] (int8) or None, bias [N] or None,
    gelu) -> float32 [M, N]."""
    if backend == "triton":
        return torch.ops.mmdkernels.small_batch_linear_quantized_triton
    return _ext.compiled_op("small_batch_linear_quantized", backend)


def blocking_choices() -> list[dict]:
    """The few-row C++ kernel's measured weight-row blocking per shape (csrc/linear/blocking.h): one entry per decided
    shape, {"dtype", "rows", "dim", "out_features", "threads", "chosen": "wide" | "spread" | "single" | "segments",
    "gb_per_s": {...}}. ``MMDKERNELS_LINEAR_BLOCKING=auto|wide|spread|single|segments`` forces one (read at every
    call; all sum in the same order)."""
    return json.loads(_ext.compiled_op("linear_blocking_choices", "cpp")())


def tile_paths() -> list[str]:
    """The AMX tile paths the few-row C++ kernel takes on this CPU now: "bf16" (bfloat16 weights from 5 rows, float32
    from 13; csrc/linear/linear_amx.h) and "int8" (int8 weights at every row count: x as four 8-bit digits on
    AMX-INT8 tiles, csrc/linear/linear_amx_int8.h); [] without AMX or under ``MMDKERNELS_LINEAR_AMX=0``."""
    return list(_ext.compiled_op("linear_tile_paths", "cpp")())
