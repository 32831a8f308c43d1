"""The fused RVQ ops as torch.library custom ops with fake implementations: compiled (`mmdkernels::rvq_encode`,
`mmdkernels::rvq_decode`; schemas in csrc/bindings.cpp, CPU and CUDA by dispatch key) and their Triton twins.
Encoding is not differentiable (argmin); models use the straight-through estimator around it."""

from __future__ import annotations

import torch

from mmdkernels import _ext


def _encode_fake(x, codebooks, sqnorms, return_quantized):
    n, num_codebooks, dim = x.shape[0], codebooks.shape[0], codebooks.shape[2]
    codes = x.new_empty((n, num_codebooks), dtype=torch.int64)
    return codes, x.new_empty((n, num_codebooks, dim) if return_quantized else (0,))


def _decode_fake(codes, codebooks):
    return codebooks.new_empty((codes.shape[0], codebooks.shape[2]))


@torch.library.custom_op("mmdkernels::rvq_encode_triton", mutates_args=())
def rvq_encode_triton(
    x: torch.Tensor, codebooks: torch.Tensor, sqnorms: torch.Tensor, return_quantized: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from mmdkernels.rvq import triton_kernels

    return triton_kernels.rvq_encode_triton(x, codebooks, sqnorms, return_quantized)


@torch.library.custom_op("mmdkernels::rvq_decode_triton", mutates_args=())
def rvq_decode_triton(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    from mmdkernels.rvq import triton_kernels

    return triton_kernels.rvq_decode_triton(codes, codebooks)


rvq_encode_triton.register_fake(_encode_fake)
rvq_decode_triton.register_fake(_decode_fake)


_ext.register_on_load("mmdkernels::rvq_encode", _encode_fake)
_ext.register_on_load("mmdkernels::rvq_decode", _decode_fake)


def encode_op(backend: str):
    """The RVQ encode op for backend 'cpp', 'cuda' or 'triton'."""
    if backend == "triton":
        return torch.ops.mmdkernels.rvq_encode_triton
    return _ext.compiled_op("rvq_encode", backend)


def decode_op(backend: str):
    """The RVQ decode op for backend 'cpp', 'cuda' or 'triton'."""
    if backend == "triton":
        return torch.ops.mmdkernels.rvq_decode_triton
    return _ext.compiled_op("rvq_decode", backend)
