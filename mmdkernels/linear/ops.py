"""The compiled few-row linear ops (csrc/linear/linear_cpu.cpp) and their fakes for torch.compile."""

from __future__ import annotations

from mmdkernels import _ext


def _small_batch_linear_fake(x, weight, bias, gelu):
    return x.new_empty(x.shape[0], weight.shape[0])


def _small_batch_linear_quantized_fake(x, weight, scale, bias, gelu):
    return x.new_empty(x.shape[0], weight.shape[0])


_ext.register_on_load("mmdkernels::small_batch_linear", _small_batch_linear_fake)
_ext.register_on_load("mmdkernels::small_batch_linear_quantized", _small_batch_linear_quantized_fake)


def small_batch_linear_op():
    """mmdkernels::small_batch_linear: (rows [M, D] float32, weight [N, D], bias [N] or None, gelu) -> [M, N]."""
    return _ext.compiled_op("small_batch_linear", "cpp")


def small_batch_linear_quantized_op():
    """mmdkernels::small_batch_linear_quantized: (rows [M, D] float32, weight [N, D] bfloat16 or int8, scale float32
    [N] (int8) or None (bfloat16), bias [N] or None, gelu) -> float32 [M, N]."""
    return _ext.compiled_op("small_batch_linear_quantized", "cpp")
