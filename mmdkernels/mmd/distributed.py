"""Global-batch MMD over torch.distributed: the loss over the union of every rank's samples (docs/mmd_kernels.md).

Every rank runs the same collectives in the same order:
 1. agree: one all_gather of each rank's metadata (an error flag, its sizes, a checksum of the arguments, a seed).
    A rank whose input fails validation raises there, and every other rank raises too, before any collective that
    could wait on it forever.
 2. gather: all_gather of the samples [N_r, K, D] (padded to the largest rank) into s [N, K, D], the ranks'
    samples in rank order, standardised over all N exactly as the single-process loss does.
 3. share: rank r takes the rows [N r / P, N (r + 1) / P) of the (n, m) plane. Every row has the same work (full
    rows, or on C++ a symmetric term's cyclic half: docs/mmd_kernels.md), so equal row blocks are equal work. It
    gets a partial loss and a partial gradient for all N samples; all_reduce(SUM) adds them up. dHSIC all-reduces
    its pass-1 row sums first.
 4. the standardisation's backward on the full gradient (identical on every rank); each rank keeps its own rows.
Like the single-process fused loss, the gradient is computed in the forward pass: backward runs no collective.
"""

from __future__ import annotations

import zlib
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from mmdkernels.mmd import ops
from mmdkernels.mmd.plan import plan_op_args
from mmdkernels.mmd.reference import (
    codebook_groups,
    delay_align,
    dhsic_ref,
    draw_permutations,
    flatten_samples,
    normalization_weights,
    shuffle_loss,
    shuffle_sums_ref,
    standardize,
)
from mmdkernels.mmd.samples import gather_samples, scatter_samples, standardize_, standardize_backward_

# Fields of the metadata every rank contributes to the agreement all_gather.
_OK, _BATCH, _CODEBOOKS, _DIM, _FRAMES, _CHECKSUM, _NEEDS_GRAD, _SEED = range(8)
_SEED_BOUND = 2**62


class _PrecomputedGrad(torch.autograd.Function):
    """loss, with d loss / d x = grad_x (computed in the forward pass)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, grad_x: torch.Tensor | None) -> torch.Tensor:
        if grad_x is not None:
            ctx.save_for_backward(grad_x)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_x,) = ctx.saved_tensors
        return grad_loss.to(grad_x.dtype) * grad_x, None, None


def row_share(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [begin, end) of the N x N plane that `rank` computes: contiguous blocks of equal size (+-1). Every
    backend gives every row the same work (full rows, or the cyclic half of a symmetric term), so equal blocks are
    equal work."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def _checksum(*values) -> int:
    """A checksum of the arguments that every rank must agree on (crc32: the same in every process)."""
    return zlib.crc32(repr(values).encode())


def _agree(
    x: torch.Tensor, check: Callable[[], tuple], arguments: tuple, draw_seed: bool, group
) -> tuple[tuple, torch.Tensor]:
    """Validates the local input and gathers every rank's metadata [P, 8]; raises on every rank if any rank failed.

    `check` returns (bandwidths, T'_r, backend); `arguments` are the other values every rank must agree on.
    Returns what `check` returned and the metadata.
    """
    checked, error = None, None
    try:
        checked = check()
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    meta = torch.zeros(8, dtype=torch.int64)
    if error is None:
        batch, num_codebooks, dim, num_frames = x.shape
        meta[_OK] = 1
        meta[_BATCH], meta[_CODEBOOKS], meta[_DIM], meta[_FRAMES] = batch, num_codebooks, dim, checked[1]
        meta[_CHECKSUM] = _checksum(*arguments, checked[0], checked[2])
        meta[_NEEDS_GRAD] = int(torch.is_grad_enabled() and x.requires_grad)
        if draw_seed:
            meta[_SEED] = int(torch.randint(_SEED_BOUND, (), dtype=torch.int64))
    device = _collective_device(x, group)
    gathered = [torch.empty(8, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, meta.to(device), group=group)
    metas = torch.stack(gathered).cpu()
    rank = dist.get_rank(group)
    failed = [r for r in range(len(gathered)) if metas[r, _OK] == 0]
    if error is not None:
        raise type(error)(f"{error} (mmd_loss with process_group: rank {rank} of {len(gathered)})") from error
    if failed:
        raise RuntimeError(
            f"mmd_loss with process_group: rank(s) {failed} rejected their input (see the error raised there); "
            f"rank {rank} stops too"
        )
    for field, name in ((_CODEBOOKS, "K (x.shape[1])"), (_DIM, "D (x.shape[2])"), (_CHECKSUM, "arguments")):
        if not bool((metas[:, field] == metas[0, field]).all()):
            what = [int(v) for v in metas[:, field]] if field != _CHECKSUM else "delay, bandwidths, mode, ..."
            raise ValueError(
                f"mmd_loss with process_group: every rank must pass the same {name}, got {what} "
                f"(dtype, delay, bandwidths, mode, estimator, normalization and backend must match too)"
            )
    return checked, metas


def _collective_device(x: torch.Tensor, group) -> torch.device:
    """Where the collectives' tensors live: CUDA for NCCL, else the CPU."""
    return x.device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _gather_rows(local: torch.Tensor, counts: Sequence[int], group) -> torch.Tensor:
    """all_gather of [N_r, ...] from every rank (sizes `counts`) -> [sum N_r, ...] in rank order."""
    device = _collective_device(local, group)
    largest = max(counts)
    padded = torch.zeros((len(counts), largest) + tuple(local.shape[1:]), dtype=local.dtype, device=device)
    send = padded.new_zeros((largest,) + tuple(local.shape[1:]))
    send[: local.shape[0]] = local
    dist.all_gather(list(padded.unbind(0)), send, group=group)
    if all(c == largest for c in counts):
        return padded.view((-1,) + tuple(local.shape[1:])).to(local.device)
    return torch.cat([padded[r, :count] for r, count in enumerate(counts)]).to(local.device)


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    device = _collective_device(tensor, group)
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
    return moved.to(tensor.device)


def _check_permutations(perms: torch.Tensor, group) -> None:
    """Raises on every rank unless every rank drew the same permutations (the generator's seed must match)."""
    positions = torch.arange(1, perms.shape[1] + 1, dtype=torch.int64, device=perms.device)
    fingerprint = int((perms * positions).sum())
    extremes = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64)
    extremes = _all_reduce_max(extremes, perms, group)
    if int(extremes[0]) != -int(extremes[1]):
        raise RuntimeError(
            "mmd_loss with process_group: the ranks drew different permutations. A generator passed with "
            "process_group must be seeded identically on every rank (or pass generator=None: the ranks then "
            "share a seed drawn by rank 0)"
        )


def _all_reduce_max(values: torch.Tensor, like: torch.Tensor, group) -> torch.Tensor:
    moved = values.to(_collective_device(like, group))
    dist.all_reduce(moved, op=dist.ReduceOp.MAX, group=group)
    return moved.cpu()


def mmd_loss_distributed(
    x: torch.Tensor,
    process_group,
    check: Callable[[], tuple],
    *,
    delay: bool,
    mode: str,
    estimator: str,
    normalization: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`mmdkernels.mmd_loss(..., process_group=group)`: the loss over every rank's samples together.

    Args:
        x: this rank's [B_r, K, D, T_r]; K and D equal on every rank, B_r and T_r may differ.
        process_group: an initialised torch.distributed group (torch.distributed.group.WORLD for all ranks).
        check: validates the local arguments, returns (bandwidths, T'_r, backend); raising marks this rank failed.
        delay, mode, estimator, normalization, generator: as mmd_loss.
    Returns:
        0-dim loss, identical on every rank, equal to the single-process loss on the ranks' samples concatenated in
        rank order; its gradient w.r.t. x is this rank's rows of the single-process gradient.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("mmd_loss: process_group was given but torch.distributed is not initialised")
    group = process_group
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    draw_seed = estimator == "shuffle" and generator is None
    (bandwidths, _, backend), metas = _agree(
        x,
        check,
        (str(x.dtype), x.device.type, delay, mode, estimator, normalization),
        draw_seed,
        group,
    )
    frames = metas[:, _FRAMES]
    counts = [int(c) for c in metas[:, _BATCH] * frames]
    num_samples, batch = sum(counts), int(metas[:, _BATCH].sum())
    if num_samples < 2 or (normalization == "reference" and batch < 2):
        raise ValueError(
            f"the loss needs N >= 2 samples over all ranks (and B >= 2 for normalization='reference'), got "
            f"N = {num_samples}, B = {batch}"
        )
    needs_grad = bool(metas[:, _NEEDS_GRAD].max())
    num_codebooks = x.shape[1]
    groups = codebook_groups(num_codebooks, mode, device=x.device)
    perms = None
    if estimator == "shuffle":
        if generator is None:  # rank 0's seed, from the global RNG
            shared = torch.Generator(device=x.device).manual_seed(int(metas[0, _SEED]))
            perms = draw_permutations(num_samples, num_codebooks, shared, x.device)
        else:
            perms = draw_permutations(num_samples, num_codebooks, generator, x.device)
            _check_permutations(perms, group)
    rows = row_share(num_samples, rank, world_size)
    offset = sum(counts[:rank])

    with torch.no_grad():
        if backend == "reference":
            loss, grad_samples = _reference_share(
                x, delay, counts, groups, perms, bandwidths, estimator, batch, normalization, group
            )
        else:
            samples = _gather_rows(gather_samples(x, delay), counts, group)
            std = standardize_(samples)
            loss, grad_z = _fused_share(
                samples, groups, perms, bandwidths, estimator, normalization, batch, backend, rows, needs_grad, group
            )
            grad_samples = standardize_backward_(grad_z, samples, std) if needs_grad else None
        grad_x = None
        if needs_grad and x.requires_grad:
            grad_x = scatter_samples(grad_samples[offset : offset + counts[rank]].contiguous(), x, delay)
    loss = _PrecomputedGrad.apply(x, loss, grad_x) if grad_x is not None else loss
    if estimator == "shuffle":
        _, constant = normalization_weights(normalization, num_samples, batch, groups.shape[0], len(bandwidths))
        loss = shuffle_loss(loss, normalization, constant)
    return loss


def _fused_share(
    samples: torch.Tensor,
    groups: torch.Tensor,
    perms: torch.Tensor | None,
    bandwidths: tuple[float, ...],
    estimator: str,
    normalization: str,
    batch: int,
    backend: str,
    rows: tuple[int, int],
    needs_grad: bool,
    group,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's rows through the fused row-range ops, summed over the ranks: (loss float32 [], grad [N, K, D])."""
    shuffle_rows, dhsic_sums, dhsic_rows = ops.row_range_ops(backend)
    plan_args = plan_op_args(tuple(bandwidths))
    if estimator == "dhsic":
        sums = _all_reduce(dhsic_sums(samples, groups, *plan_args, *rows), group)
        loss, grad = dhsic_rows(samples, groups, *plan_args, sums, *rows, needs_grad)
    else:
        weights, _ = normalization_weights(normalization, samples.shape[0], batch, groups.shape[0], len(bandwidths))
        partial, grad = shuffle_rows(samples, perms, groups, *plan_args, list(weights), *rows, needs_grad)
        loss = _all_reduce(partial.reshape(1), group).reshape(()).float()
    return loss, _all_reduce(grad, group) if needs_grad else None


def _reference_share(
    x: torch.Tensor,
    delay: bool,
    counts: Sequence[int],
    groups: torch.Tensor,
    perms: torch.Tensor | None,
    bandwidths: tuple[float, ...],
    estimator: str,
    batch: int,
    normalization: str,
    group,
) -> tuple[torch.Tensor, torch.Tensor]:
    """backend='reference': every rank gathers all samples and computes the whole loss (no split, O(N^2) memory)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    local = flatten_samples(delay_align(x.to(dtype)) if delay else x.to(dtype))
    samples = _gather_rows(local, counts, group).requires_grad_(True)
    with torch.enable_grad():
        z = standardize(samples)
        if estimator == "dhsic":
            loss = dhsic_ref(z, groups, bandwidths)
        else:
            weights, _ = normalization_weights(normalization, z.shape[0], batch, groups.shape[0], len(bandwidths))
            loss = shuffle_sums_ref(z, perms, groups, bandwidths, weights)
        (grad,) = torch.autograd.grad(loss, samples)
    return loss.detach(), grad
