"""The compiled few-row linear op (csrc/linear/linear_cpu.cpp) and its fake for torch.compile."""

from __future__ import annotations

import torch

from mmdkernels import _ext


def _small_batch_linear_fake(x, weight, bias, gelu):
    return x.new_empty(x.shape[0], weight.shape[0])


_ext.register_on_load("mmdkernels::small_batch_linear", _small_batch_linear_fake)


def small_batch_linear_op():
    """mmdkernels::small_batch_linear: (rows [M, D] float32, weight [N, D], bias [N] or None, gelu) -> [M, N]."""
    return _ext.compiled_op("small_batch_linear", "cpp")
