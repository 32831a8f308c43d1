"""The fused MMD ops as torch.library custom ops, each with a fake (meta) implementation and registered autograd.

Compiled ops (`mmdkernels::mmd_shuffle`, `mmdkernels::mmd_dhsic`; schemas in csrc/bindings.cpp, CPU and CUDA
implementations by dispatch key) and their Triton twins (`..._triton`, defined here) share one contract
(docs/mmd_kernels.md): they return (loss, grad). The loss is a scalar, so the gradient is computed in the same tile
pass as the loss (as fused cross-entropy kernels do) and backward only scales it by the incoming gradient.
"""

from __future__ import annotations

import torch

from mmdkernels import _ext

_registered: set[str] = set()


def _fake(z: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    compute_grad = args[-1]
    return z.new_empty(()), z.new_empty(tuple(z.shape) if compute_grad else (0,))


def _setup_context(ctx, inputs, output) -> None:
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss: torch.Tensor, _unused: torch.Tensor):
    (grad_z,) = ctx.saved_tensors
    if grad_z.numel() == 0:
        raise RuntimeError("mmd op was called with compute_grad=False; cannot backpropagate through it")
    return (grad_loss * grad_z,) + (None,) * (ctx.num_inputs - 1)


def _register(name: str) -> None:
    if name in _registered:
        return
    torch.library.register_fake(name)(_fake)
    torch.library.register_autograd(name, _backward, setup_context=_setup_context)
    _registered.add(name)


@torch.library.custom_op("mmdkernels::mmd_shuffle_triton", mutates_args=())
def mmd_shuffle_triton(
    z: torch.Tensor,
    perms: torch.Tensor,
    groups: torch.Tensor,
    coefs: list[float],
    chain_src: list[int],
    chain_step: list[int],
    chain_base: float,
    term_weights: list[float],
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from mmdkernels.mmd import triton_kernels

    return triton_kernels.mmd_shuffle_triton(
        z, perms, groups, coefs, chain_src, chain_step, chain_base, term_weights, compute_grad
    )


@torch.library.custom_op("mmdkernels::mmd_dhsic_triton", mutates_args=())
def mmd_dhsic_triton(
    z: torch.Tensor,
    groups: torch.Tensor,
    coefs: list[float],
    chain_src: list[int],
    chain_step: list[int],
    chain_base: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from mmdkernels.mmd import triton_kernels

    return triton_kernels.mmd_dhsic_triton(z, groups, coefs, chain_src, chain_step, chain_base, compute_grad)


_register("mmdkernels::mmd_shuffle_triton")
_register("mmdkernels::mmd_dhsic_triton")


def shuffle_op(backend: str):
    """The op computing the shuffle estimator for `backend` in ('cpp', 'cuda', 'triton')."""
    if backend == "triton":
        return torch.ops.mmdkernels.mmd_shuffle_triton
    _load_compiled(backend)
    _register("mmdkernels::mmd_shuffle")
    return torch.ops.mmdkernels.mmd_shuffle


def dhsic_op(backend: str):
    """The op computing the dHSIC estimator for `backend` in ('cpp', 'cuda', 'triton')."""
    if backend == "triton":
        return torch.ops.mmdkernels.mmd_dhsic_triton
    _load_compiled(backend)
    _register("mmdkernels::mmd_dhsic")
    return torch.ops.mmdkernels.mmd_dhsic


def _load_compiled(backend: str) -> None:
    module = _ext.cuda_extension() if backend == "cuda" else _ext.cpu_extension()
    if module is None:
        raise RuntimeError(_ext.load_error("cuda" if backend == "cuda" else "cpu"))
