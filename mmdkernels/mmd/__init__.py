"""The fused multi-kernel MMD independence loss (arXiv 2406.02315) over RVQ codebooks: public function."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mmdkernels._dispatch import checking_values, choose_backend
from mmdkernels.mmd import distributed, ops
from mmdkernels.mmd.plan import MAX_BANDWIDTHS, plan_op_args
from mmdkernels.mmd.reference import (
    DEFAULT_BANDWIDTHS,
    ESTIMATORS,
    MODES,
    NORMALIZATIONS,
    codebook_groups,
    draw_permutations,
    mmd_loss_ref,
    normalization_weights,
    shuffle_loss,
)
from mmdkernels.mmd.samples import FusedLoss

MAX_CODEBOOKS = 32  # kMaxCodebooks in csrc/mmd/mmd_tile.h

__all__ = ["mmd_loss", "mmd_loss_ref", "DEFAULT_BANDWIDTHS"]


def _check_arguments(
    x, delay, bandwidths, mode, estimator, normalization, generator, local_share: bool = False
) -> tuple[float, ...]:
    """Validates mmd_loss's arguments; returns the bandwidths as floats. local_share: x is one rank's share of a
    distributed batch (the sample-count checks then apply to the whole batch, in distributed.py)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [B, K, D, T], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor (float32, bfloat16, float16 or float64), got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, K, D, T] (4 dims), got shape {tuple(x.shape)}")
    batch, num_codebooks, dim, num_frames = x.shape
    if min(batch, num_codebooks, dim, num_frames) < 1:
        raise ValueError(f"x must have non-empty dims [B, K, D, T], got shape {tuple(x.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if estimator == "dhsic" and normalization == "reference":
        raise ValueError(
            "normalization='reference' (the published batch-size scaling) applies to estimator='shuffle' only"
        )
    if mode == "pairwise" and num_codebooks < 2:
        raise ValueError(
            f"mode='pairwise' needs K >= 2 codebooks, got x of shape {tuple(x.shape)} (K = {num_codebooks})"
        )
    if delay and num_frames <= num_codebooks:
        raise ValueError(
            f"delay=True needs T > K frames (the delay alignment keeps T - K), "
            f"got T = {num_frames}, K = {num_codebooks}"
        )
    num_samples = batch * (num_frames - num_codebooks if delay else num_frames)
    if num_samples < 2 and not local_share:
        raise ValueError(
            f"the loss needs N = B * T' >= 2 samples, got N = {num_samples} from x of shape {tuple(x.shape)}"
        )
    if normalization == "reference" and batch < 2 and not local_share:
        raise ValueError(f"normalization='reference' divides by B (B - 1) and needs batch size B >= 2, got B = {batch}")
    bandwidths = tuple(float(a) for a in bandwidths)
    if not 1 <= len(bandwidths) <= MAX_BANDWIDTHS or not all(math.isfinite(a) and a > 0 for a in bandwidths):
        raise ValueError(f"bandwidths must be 1..{MAX_BANDWIDTHS} positive finite numbers, got {bandwidths}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise ValueError(f"generator is on {generator.device} but x is on {x.device}: they must match")
    if checking_values() and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf")
    return bandwidths


def mmd_loss(
    x: torch.Tensor,
    *,
    delay: bool = False,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    mode: str = "joint",
    estimator: str = "shuffle",
    normalization: str = "unbiased",
    generator: torch.Generator | None = None,
    backend: str | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """Multi-kernel MMD between the joint codebook outputs and the product of their marginals.

    Args:
        x: [B, K, D, T] per-codebook quantized outputs (float32/bfloat16/float16; float64 runs the reference).
        delay: align codebook k by k frames first (the delay pattern's joint step); keeps T - K frames.
        bandwidths: Gaussian kernel parameters a, kernel exp(-d^2 / (2a)), summed.
        mode: "joint" (all K codebooks together) or "pairwise" (sum over codebook pairs i < j).
        estimator: "shuffle" (one random permutation per codebook, as published) or "dhsic" (exact, shuffle-free
            dHSIC V-statistic of the same quantity: no randomness, lower variance).
        normalization: "unbiased" (N-sample U-statistic, can be slightly negative) or "reference" (the published
            batch-size scaling and clamp at 0; shuffle only).
        generator: torch.Generator for the permutations (None: the global RNG, as the published code).
        backend: "cpp", "cuda", "triton" or "reference"; None picks the fastest available (the environment can
            force one, as for every op: mmdkernels/_dispatch.py).
        process_group: a torch.distributed group (torch.distributed.group.WORLD: all ranks): the loss over the
            samples of every rank together (docs/mmd_kernels.md, "Global-batch MMD"); a collective, so every rank
            of the group must call it. With the shuffle estimator a `generator` must be seeded identically on
            every rank (checked); None shares a seed drawn by rank 0. None (default): this process's x only.
    Returns:
        0-dim float32 tensor (float64 for float64 input), differentiable w.r.t. x.

    Example:
        >>> q = torch.randn(8, 4, 128, 50, requires_grad=True)
        >>> mmdkernels.mmd_loss(q, delay=True).backward()
    """
    if process_group is not None:

        def check_share():
            checked = _check_arguments(x, delay, bandwidths, mode, estimator, normalization, generator, True)
            frames = x.shape[3] - x.shape[1] if delay else x.shape[3]
            return checked, frames, choose_backend(x, backend, "mmd_loss", MAX_CODEBOOKS)

        return distributed.mmd_loss_distributed(
            x,
            process_group,
            check_share,
            delay=delay,
            mode=mode,
            estimator=estimator,
            normalization=normalization,
            generator=generator,
        )
    bandwidths = _check_arguments(x, delay, bandwidths, mode, estimator, normalization, generator)
    backend = choose_backend(x, backend, "mmd_loss", MAX_CODEBOOKS)
    if backend == "reference":
        return mmd_loss_ref(
            x,
            delay=delay,
            bandwidths=bandwidths,
            mode=mode,
            estimator=estimator,
            normalization=normalization,
            generator=generator,
        )
    batch, num_codebooks = x.shape[0], x.shape[1]
    num_samples = batch * (x.shape[3] - num_codebooks if delay else x.shape[3])
    groups = codebook_groups(num_codebooks, mode, device=x.device)
    plan_args = plan_op_args(tuple(bandwidths))
    if estimator == "dhsic":
        op = ops.dhsic_op(backend)

        def run_kernel(z, compute_grad):
            return op(z, groups, *plan_args, compute_grad)

        return FusedLoss.apply(x, delay, run_kernel)
    perms = draw_permutations(num_samples, num_codebooks, generator, x.device)
    weights, constant = normalization_weights(normalization, num_samples, batch, groups.shape[0], len(bandwidths))
    op = ops.shuffle_op(backend)

    def run_kernel(z, compute_grad):
        return op(z, perms, groups, *plan_args, list(weights), compute_grad)

    return shuffle_loss(FusedLoss.apply(x, delay, run_kernel), normalization, constant)
