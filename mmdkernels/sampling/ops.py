"""The fused sampling op as torch.library custom ops with fake implementations: compiled (`mmdkernels::sample_tokens`,
schema in csrc/bindings.cpp, CPU and CUDA by dispatch key) and its Triton twin. Not differentiable (a draw)."""

from __future__ import annotations

import torch

from mmdkernels import _ext


def _sample_fake(logits, uniforms, temperature, top_k, top_p, cfg_coef, use_cfg):
    return logits.new_empty(tuple(uniforms.shape), dtype=torch.int64)


@torch.library.custom_op("mmdkernels::sample_tokens_triton", mutates_args=())
def sample_tokens_triton(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    cfg_coef: float,
    use_cfg: bool,
) -> torch.Tensor:
    from mmdkernels.sampling import triton_kernels

    return triton_kernels.sample_tokens_triton(logits, uniforms, temperature, top_k, top_p, cfg_coef, use_cfg)


sample_tokens_triton.register_fake(_sample_fake)


_ext.register_on_load("mmdkernels::sample_tokens", _sample_fake)


def sample_op(backend: str):
    """The fused sampling op for backend 'cpp', 'cuda' or 'triton'."""
    if backend == "triton":
        return torch.ops.mmdkernels.sample_tokens_triton
    return _ext.compiled_op("sample_tokens", backend)
