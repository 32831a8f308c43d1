"""The fused MMD ops as torch.library custom ops, each with a fake (meta) implementation and registered autograd.

Compiled ops (`mmdkernels::mmd_shuffle`, `mmdkernels::mmd_dhsic` and the row-range forms; schemas in
csrc/bindings.cpp, CPU and CUDA implementations by dispatch key) and their Triton twins (`..._triton`, defined here)
share one contract (docs/mmd_kernels.md, "Inputs"; checked by csrc/mmd/mmd_args.h and triton_common.py): z float32
[N, K, D] contiguous, perms int64 [K, N] and groups int32 [G, K] on z's device, the plan of plan.plan_op_args.
Callers build them with reference.draw_permutations, reference.codebook_groups(..., device=z.device) and
plan.plan_op_args, which produce exactly that. They return (loss, grad). The loss is a scalar, so the gradient is
computed in the same tile pass as the loss (as fused cross-entropy kernels do) and backward only scales it by the
incoming gradient.
"""

from __future__ import annotations

import json

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
    from mmdkernels.mmd import triton_shuffle

    return triton_shuffle.mmd_shuffle_triton(
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
    from mmdkernels.mmd import triton_dhsic

    return triton_dhsic.mmd_dhsic_triton(z, groups, coefs, chain_src, chain_step, chain_base, compute_grad)


@torch.library.custom_op("mmdkernels::mmd_shuffle_rows_triton", mutates_args=())
def mmd_shuffle_rows_triton(
    z: torch.Tensor,
    perms: torch.Tensor,
    groups: torch.Tensor,
    coefs: list[float],
    chain_src: list[int],
    chain_step: list[int],
    chain_base: float,
    term_weights: list[float],
    row_begin: int,
    row_end: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from mmdkernels.mmd import triton_shuffle

    return triton_shuffle.mmd_shuffle_triton(
        z, perms, groups, coefs, chain_src, chain_step, chain_base, term_weights, compute_grad, (row_begin, row_end)
    )


@torch.library.custom_op("mmdkernels::mmd_dhsic_sums_triton", mutates_args=())
def mmd_dhsic_sums_triton(
    z: torch.Tensor,
    groups: torch.Tensor,
    coefs: list[float],
    chain_src: list[int],
    chain_step: list[int],
    chain_base: float,
    row_begin: int,
    row_end: int,
) -> torch.Tensor:
    from mmdkernels.mmd import triton_dhsic

    return triton_dhsic.mmd_dhsic_sums_triton(z, groups, coefs, chain_src, chain_step, chain_base, row_begin, row_end)


@torch.library.custom_op("mmdkernels::mmd_dhsic_rows_triton", mutates_args=())
def mmd_dhsic_rows_triton(
    z: torch.Tensor,
    groups: torch.Tensor,
    coefs: list[float],
    chain_src: list[int],
    chain_step: list[int],
    chain_base: float,
    sums: torch.Tensor,
    row_begin: int,
    row_end: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from mmdkernels.mmd import triton_dhsic

    return triton_dhsic.mmd_dhsic_rows_triton(
        z, groups, coefs, chain_src, chain_step, chain_base, sums, row_begin, row_end, compute_grad
    )


def _fake_shuffle_rows(z: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    compute_grad = args[-1]
    return z.new_empty((), dtype=torch.float64), z.new_empty(tuple(z.shape) if compute_grad else (0,))


def _fake_dhsic_sums(z: torch.Tensor, groups: torch.Tensor, coefs: list[float], *args) -> torch.Tensor:
    return z.new_empty((z.shape[1] * len(coefs) + 1, z.shape[0]), dtype=torch.float64)


_ROW_RANGE_FAKES = {
    "mmd_shuffle_rows": _fake_shuffle_rows,
    "mmd_dhsic_sums": _fake_dhsic_sums,
    "mmd_dhsic_rows": _fake,
}


def _register_row_range(name: str) -> None:
    """Fake implementations of the row-range ops (no autograd: the distributed loss calls them under no_grad)."""
    qualified = f"mmdkernels::{name}"
    if qualified not in _registered:
        torch.library.register_fake(qualified)(_ROW_RANGE_FAKES[name.removesuffix("_triton")])
        _registered.add(qualified)


_register("mmdkernels::mmd_shuffle_triton")
_register("mmdkernels::mmd_dhsic_triton")
for _name in ("mmd_shuffle_rows_triton", "mmd_dhsic_sums_triton", "mmd_dhsic_rows_triton"):
    _register_row_range(_name)
# the compiled twins: registered when the extension loads (csrc/bindings.cpp defines their schemas)
for _name in ("mmdkernels::mmd_shuffle", "mmdkernels::mmd_dhsic"):
    _ext.register_on_load(_name, _fake, _backward, _setup_context)
for _name, _row_fake in _ROW_RANGE_FAKES.items():
    _ext.register_on_load(f"mmdkernels::{_name}", _row_fake)


def shuffle_op(backend: str):
    """The op computing the shuffle estimator for `backend` in ('cpp', 'cuda', 'triton')."""
    if backend == "triton":
        return torch.ops.mmdkernels.mmd_shuffle_triton
    _load_compiled(backend)
    return torch.ops.mmdkernels.mmd_shuffle


def dhsic_op(backend: str):
    """The op computing the dHSIC estimator for `backend` in ('cpp', 'cuda', 'triton')."""
    if backend == "triton":
        return torch.ops.mmdkernels.mmd_dhsic_triton
    _load_compiled(backend)
    return torch.ops.mmdkernels.mmd_dhsic


def row_range_ops(backend: str):
    """(mmd_shuffle_rows, mmd_dhsic_sums, mmd_dhsic_rows) for `backend` in ('cpp', 'cuda', 'triton')."""
    names = ("mmd_shuffle_rows", "mmd_dhsic_sums", "mmd_dhsic_rows")
    if backend == "triton":
        return tuple(getattr(torch.ops.mmdkernels, f"{name}_triton") for name in names)
    _load_compiled(backend)
    return tuple(getattr(torch.ops.mmdkernels, name) for name in names)


def dhsic_tile_choices() -> list[dict]:
    """The C++ CPU dHSIC's measured distance-tile choices in this process, one per shape class: {"rows", "cols" (the
    tile, bucketed to powers of two), "codebooks", "width", "threads", "schedule" ("per-thread": one tile per thread;
    "inside": the threads inside a tile), "chosen" ("gemm" | "fused"), "seconds": {"gemm": s, "fused": s}}. Empty
    before the first dHSIC call, or when MMDKERNELS_MMD_TILE forces a kernel (nothing is measured then)."""
    _load_compiled("cpp")
    return json.loads(torch.ops.mmdkernels.mmd_dhsic_tile_choices())


def _load_compiled(backend: str) -> None:
    which = "cuda" if backend == "cuda" else "cpu"
    if not _ext.available(which):
        raise RuntimeError(_ext.load_error(which))
