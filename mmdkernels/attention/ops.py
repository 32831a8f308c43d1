"""Decode attention as torch.library custom ops with fake implementations: the compiled one
(`mmdkernels::decode_attention`; schema in csrc/bindings.cpp, CPU and CUDA kernels by dispatch key) and its Triton
twin. Inference only (no autograd): the decode step of a KV-cached generator."""

from __future__ import annotations

import torch

from mmdkernels import _ext


def _decode_attention_fake(q, k_cache, v_cache, lengths, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("mmdkernels::decode_attention_triton", mutates_args=())
def decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    from mmdkernels.attention import triton_kernels

    return triton_kernels.decode_attention_triton(q, k_cache, v_cache, lengths, scale)


decode_attention_triton.register_fake(_decode_attention_fake)
_ext.register_on_load("mmdkernels::decode_attention", _decode_attention_fake)


def decode_attention_op(backend: str):
    """The decode attention op for backend 'cpp', 'cuda' or 'triton'."""
    if backend == "triton":
        return torch.ops.mmdkernels.decode_attention_triton
    return _ext.compiled_op("decode_attention", backend)
