# Triton kernels of the dHSIC estimator (mmd_dhsic, mmd_dhsic_sums, mmd_dhsic_rows; contract and maths:
# docs/mmd_kernels.md). Two passes over tiles of per-codebook distances (triton_common.py), each program owning BLOCK_N
# rows against every column: pass 1 reduces each Gram matrix E_{k,j} to row sums (kept in registers per row block)
# and each group's product of Grams to a joint sum; the loss and the gradient terms follow from those on the host
# (dhsic_stats.py, the formula of the C++ ops). Pass 2 recomputes the tiles, turns them into the symmetrised weights
# W_k and accumulates rowsum(W) and W @ z in registers. The Grams are symmetric: both passes visit each unordered pair
# of blocks once, a mirrored tile's column sums and column-side gradient added to its columns' rows by atomics (every
# tile under torch.use_deterministic_algorithms: see triton_common.py). Float32 throughout; the pass-1 sums end in
# float64.

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from mmdkernels.mmd.dhsic_stats import dhsic_statistics
from mmdkernels.mmd.triton_common import (
    NUM_WARPS,
    bandwidth_values,
    check_groups,
    check_row_range,
    check_samples,
    codebook_sqdists,
    column_block,
    column_steps,
    grad_block_d,
    grad_buffer,
    group_kernel_sums,
    group_members,
    load_samples,
    make_plan,
    mirrored_column_grad,
    mirrored_tiles,
    num_row_blocks,
    pair_copies,
    plan_kwargs,
    row_block_grad,
    sample_sqnorms,
    shape_kwargs,
)


@triton.jit
def _dhsic_dists(
    z_ptr,
    row_ids,
    row_norms,
    col_ids,
    num_samples,
    NUM_CODEBOOKS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_D: tl.constexpr,
):
    """Per-codebook distances [BK, BN, BM] with the diagonal exactly 0 (so E = 1 there, as the V-statistic needs)."""
    dists = codebook_sqdists(
        z_ptr, row_ids, row_norms, z_ptr, col_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D
    )
    return tl.where((row_ids[:, None] == col_ids[None, :])[None, :, :], 0.0, dists)


@triton.jit
def _dhsic_sums_kernel(
    z_ptr,
    groups_ptr,
    row_sums_ptr,
    joint_ptr,
    num_samples,
    row_begin,
    row_end,
    num_groups,
    NUM_CODEBOOKS: tl.constexpr,
    DIM: tl.constexpr,
    COEFS: tl.constexpr,
    SRC: tl.constexpr,
    STEP: tl.constexpr,
    BASE_COEF: tl.constexpr,
    MIRRORED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_D: tl.constexpr,
):
    """Pass 1 for one row block (block row_begin // BLOCK_N + pid), its rows in [row_begin, row_end), against every
    column or (MIRRORED) its diagonal and owned blocks (csrc/mmd/block_pairs.h): row_sums[j, k, n] = sum over the
    visited m of E_{k,j}(n, m) ([J, K, N], J bandwidths; MIRRORED: added by atomics, and a mirrored tile adds its
    column sums to rows m too); joint[pid] = sum over the visited entries (x2 mirrored), groups and bandwidths of
    prod_{k in g} E_{k,j}(n, m) = e_j(D_g(n, m))."""
    block = row_begin // BLOCK_N + tl.program_id(0)
    row_ids = block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = (row_ids >= row_begin) & (row_ids < row_end)
    row_norms = sample_sqnorms(z_ptr, row_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
    codebooks = tl.arange(0, BLOCK_K)[:, None]
    joint = tl.zeros([], tl.float32)
    row_sums = ()
    for j in tl.static_range(len(COEFS)):
        row_sums = row_sums + (tl.zeros([BLOCK_K, BLOCK_N], tl.float32),)
    num_blocks = tl.cdiv(num_samples, BLOCK_M)
    for step in range(0, column_steps(block, num_blocks, MIRRORED)):
        col_ids = column_block(block, step, num_blocks, MIRRORED) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = in_rows[:, None] & (col_ids[None, :] < num_samples)
        dists = _dhsic_dists(z_ptr, row_ids, row_norms, col_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
        grams = bandwidth_values(dists, COEFS, SRC, STEP, BASE_COEF)
        new_row_sums = ()
        for j in tl.static_range(len(COEFS)):
            gram = tl.where(valid[None, :, :], grams[j], 0.0)
            new_row_sums = new_row_sums + (row_sums[j] + tl.sum(gram, axis=2),)
            if MIRRORED:
                if step > 0:
                    col_mask = (codebooks < NUM_CODEBOOKS) & (col_ids[None, :] < num_samples)
                    offsets = (j * NUM_CODEBOOKS + codebooks) * num_samples + col_ids[None, :]
                    tl.atomic_add(row_sums_ptr + offsets, tl.sum(gram, axis=1), mask=col_mask)
        row_sums = new_row_sums
        joint_values, _ = group_kernel_sums(
            dists, groups_ptr, num_groups, NUM_CODEBOOKS, COEFS, SRC, STEP, BASE_COEF, False, BLOCK_K
        )
        joint += pair_copies(step, MIRRORED) * tl.sum(tl.where(valid, joint_values, 0.0))
    tl.store(joint_ptr + tl.program_id(0), joint)
    mask = (codebooks < NUM_CODEBOOKS) & in_rows[None, :]
    for j in tl.static_range(len(COEFS)):
        offsets = (j * NUM_CODEBOOKS + codebooks) * num_samples + row_ids[None, :]
        if MIRRORED:
            tl.atomic_add(row_sums_ptr + offsets, row_sums[j], mask=mask)
        else:
            tl.store(row_sums_ptr + offsets, row_sums[j], mask=mask)


@triton.jit
def _group_joint_sums(
    dists,
    groups_ptr,
    num_groups,
    NUM_CODEBOOKS: tl.constexpr,
    COEFS: tl.constexpr,
    SRC: tl.constexpr,
    STEP: tl.constexpr,
    BASE_COEF: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per bandwidth j, J_{k,j} = sum_{g contains k} prod_{i in g} E_{i,j} as a tuple of [BK, BN, BM] tiles.

    The group's Gram product is the kernel of the group distance: prod_{i in g} e_j(d_i) = e_j(D_g).
    """
    joint_sums = ()
    for j in tl.static_range(len(COEFS)):
        joint_sums = joint_sums + (tl.zeros(dists.shape, tl.float32),)
    for group in range(num_groups):
        member = group_members(groups_ptr, group, NUM_CODEBOOKS, BLOCK_K)[:, None, None]
        bandwidths = bandwidth_values(tl.sum(tl.where(member, dists, 0.0), axis=0), COEFS, SRC, STEP, BASE_COEF)
        new_sums = ()
        for j in tl.static_range(len(COEFS)):
            new_sums = new_sums + (joint_sums[j] + tl.where(member, bandwidths[j][None, :, :], 0.0),)
        joint_sums = new_sums
    return joint_sums


@triton.jit
def _dhsic_entry_weight(coef, inv_n2, joint_sum, gram, two_gamma, beta_row, beta_col):
    """dhsic_entry_weight of csrc/mmd/mmd_tile.h, same operation order (exactly 0 for K = 1, as the loss is)."""
    return -coef * (2.0 * inv_n2 * joint_sum + gram * (two_gamma - beta_row - beta_col))


@triton.jit
def _load_codebook_stat(
    ptr,
    bandwidth,
    samples,
    num_samples,
    NUM_CODEBOOKS: tl.constexpr,
    NUM_BANDWIDTHS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """stat[:, bandwidth, samples] of a [K, J, N] tensor as [BLOCK_K, len(samples)], 0 where out of range."""
    codebooks = tl.arange(0, BLOCK_K)[:, None]
    mask = (codebooks < NUM_CODEBOOKS) & (samples[None, :] < num_samples)
    offsets = (codebooks * NUM_BANDWIDTHS + bandwidth) * num_samples + samples[None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _dhsic_grad_kernel(
    z_ptr,
    groups_ptr,
    gamma_ptr,
    beta_ptr,
    grad_ptr,
    num_samples,
    row_begin,
    row_end,
    num_groups,
    inv_n2,
    NUM_CODEBOOKS: tl.constexpr,
    DIM: tl.constexpr,
    COEFS: tl.constexpr,
    SRC: tl.constexpr,
    STEP: tl.constexpr,
    BASE_COEF: tl.constexpr,
    MIRRORED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pass 2 for one row block (as pass 1): grad rows = 2 (rowsum(W) z - W @ z) with W the symmetrised dHSIC weight
    (dhsic_entry_weight) over the visited columns; MIRRORED: a mirrored tile's columns also get 2 (colsum(W) z -
    W^T @ z), every side added by atomics.

    gamma_ptr: [K, J]; beta_ptr: [K, J, N] (J bandwidths), from pass 1's statistics (dhsic_stats.py).
    """
    block = row_begin // BLOCK_N + tl.program_id(0)
    row_ids = block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = (row_ids >= row_begin) & (row_ids < row_end)
    row_norms = sample_sqnorms(z_ptr, row_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
    codebooks = tl.arange(0, BLOCK_K)
    two_gammas = ()
    row_betas = ()
    for j in tl.static_range(len(COEFS)):
        gamma = tl.load(gamma_ptr + codebooks * len(COEFS) + j, mask=codebooks < NUM_CODEBOOKS, other=0.0)
        two_gammas = two_gammas + (2.0 * gamma,)
        row_betas = row_betas + (
            _load_codebook_stat(beta_ptr, j, row_ids, num_samples, NUM_CODEBOOKS, len(COEFS), BLOCK_K),
        )
    weight_rowsums = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    weighted_cols = tl.zeros([BLOCK_K, BLOCK_N, BLOCK_D], tl.float32)
    num_blocks = tl.cdiv(num_samples, BLOCK_M)
    for step in range(0, column_steps(block, num_blocks, MIRRORED)):
        col_ids = column_block(block, step, num_blocks, MIRRORED) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = in_rows[:, None] & (col_ids[None, :] < num_samples)
        dists = _dhsic_dists(z_ptr, row_ids, row_norms, col_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
        grams = bandwidth_values(dists, COEFS, SRC, STEP, BASE_COEF)
        joint_sums = _group_joint_sums(
            dists, groups_ptr, num_groups, NUM_CODEBOOKS, COEFS, SRC, STEP, BASE_COEF, BLOCK_K
        )
        weights = tl.zeros(dists.shape, tl.float32)
        for j in tl.static_range(len(COEFS)):
            col_betas = _load_codebook_stat(
                beta_ptr, j, col_ids, num_samples, NUM_CODEBOOKS, len(COEFS), BLOCK_K
            )
            weights += _dhsic_entry_weight(
                COEFS[j],
                inv_n2,
                joint_sums[j],
                grams[j],
                two_gammas[j][:, None, None],
                row_betas[j][:, :, None],
                col_betas[:, None, :],
            )
        weights = tl.where(valid[None, :, :], 2.0 * weights, 0.0)
        cols = load_samples(z_ptr, col_ids, 0, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, BLOCK_D)
        weight_rowsums += tl.sum(weights, axis=2)
        weighted_cols = tl.dot(weights, cols, acc=weighted_cols, input_precision="ieee")
        if MIRRORED:
            if step > 0:
                mirrored_column_grad(
                    grad_ptr, z_ptr, row_ids, weights, cols, col_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, BLOCK_D
                )
    row_block_grad(
        grad_ptr,
        z_ptr,
        row_ids,
        in_rows,
        weight_rowsums,
        weighted_cols,
        num_samples,
        NUM_CODEBOOKS,
        DIM,
        False,
        MIRRORED,
        BLOCK_K,
        BLOCK_D,
    )


def mmd_dhsic_sums_triton(
    z: torch.Tensor,
    groups: torch.Tensor,
    coefs: Sequence[float],
    chain_src: Sequence[int],
    chain_step: Sequence[int],
    chain_base: float,
    row_begin: int,
    row_end: int,
) -> torch.Tensor:
    """dHSIC pass 1 over the rows [row_begin, row_end) (contract of mmdkernels::mmd_dhsic_sums).

    Returns:
        float64 [K*J + 1, N]: row k*J + j = the sums of E_{k,j}(n, m) over the pairs the rows in range own (every
        column of their rows, or once per block pair: a mirrored pair adds to row n and to row m); the last row holds
        their joint sum in column 0 (only its total is used). Summed over a partition of the rows: the full sums.
    """
    check_samples(z)
    check_groups(groups, z)
    plan = make_plan(coefs, chain_src, chain_step, chain_base)
    row_begin, row_end = check_row_range(z.shape[0], row_begin, row_end)
    groups = groups.contiguous()
    num_samples, num_codebooks, _ = z.shape
    num_bandwidths = len(plan.coefs)
    num_blocks = num_row_blocks(row_begin, row_end)
    row_sums = torch.zeros((num_bandwidths, num_codebooks, num_samples), dtype=torch.float32, device=z.device)
    joint_partials = torch.zeros((max(num_blocks, 1),), dtype=torch.float32, device=z.device)
    if num_blocks > 0:
        _dhsic_sums_kernel[(num_blocks,)](
            z,
            groups,
            row_sums,
            joint_partials,
            num_samples,
            row_begin,
            row_end,
            groups.shape[0],
            MIRRORED=mirrored_tiles(),
            num_warps=NUM_WARPS,
            **plan_kwargs(plan),
            **shape_kwargs(z),
        )
    sums = torch.zeros((num_codebooks * num_bandwidths + 1, num_samples), dtype=torch.float64, device=z.device)
    sums[:-1] = row_sums.double().transpose(0, 1).reshape(num_codebooks * num_bandwidths, num_samples)
    sums[-1, 0] = joint_partials.double().sum()
    return sums


def mmd_dhsic_rows_triton(
    z: torch.Tensor,
    groups: torch.Tensor,
    coefs: Sequence[float],
    chain_src: Sequence[int],
    chain_step: Sequence[int],
    chain_base: float,
    sums: torch.Tensor,
    row_begin: int,
    row_end: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dHSIC loss from the pass-1 sums of ALL rows, and the gradient of the pairs the rows [row_begin, row_end)
    own (contract of mmdkernels::mmd_dhsic_rows).

    Returns:
        (loss float32 0-dim, grad float32 [N, K, D] (summed over a partition of the rows: the full gradient) or an empty
        [0] tensor).
    """
    check_samples(z)
    check_groups(groups, z)
    plan = make_plan(coefs, chain_src, chain_step, chain_base)
    row_begin, row_end = check_row_range(z.shape[0], row_begin, row_end)
    groups = groups.contiguous()
    num_samples, num_codebooks, _ = z.shape
    num_bandwidths = len(plan.coefs)
    if (
        sums.device != z.device
        or sums.dtype != torch.float64
        or tuple(sums.shape) != (num_codebooks * num_bandwidths + 1, num_samples)
    ):
        raise ValueError(
            f"sums must be float64 [K*J + 1, N] = [{num_codebooks * num_bandwidths + 1}, {num_samples}] on {z.device}, "
            f"got {sums.dtype} {tuple(sums.shape)} on {sums.device}"
        )
    stats = dhsic_statistics(sums.contiguous(), groups, num_bandwidths, compute_grad)
    if not compute_grad:
        return stats.loss, z.new_empty(0)
    full_range = (row_begin, row_end) == (0, num_samples)
    mirrored = mirrored_tiles()
    grad = grad_buffer(z, full_range, atomic=mirrored)
    num_blocks = num_row_blocks(row_begin, row_end)
    if num_blocks == 0:
        return stats.loss, grad
    _dhsic_grad_kernel[(num_blocks,)](
        z,
        groups,
        stats.gamma,
        stats.beta,
        grad,
        num_samples,
        row_begin,
        row_end,
        groups.shape[0],
        1.0 / (float(num_samples) * float(num_samples)),
        MIRRORED=mirrored,
        BLOCK_D=grad_block_d(z),
        num_warps=NUM_WARPS,
        **plan_kwargs(plan),
        **shape_kwargs(z),
    )
    return stats.loss, grad


def mmd_dhsic_triton(
    z: torch.Tensor,
    groups: torch.Tensor,
    coefs: Sequence[float],
    chain_src: Sequence[int],
    chain_step: Sequence[int],
    chain_base: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused dHSIC V-statistic summed over groups and bandwidths (spec: reference.dhsic_ref) and its gradient.

    Args:
        z: float32 [N, K, D], contiguous (CUDA, or CPU under TRITON_INTERPRET=1).
        groups: int32 [G, K] 0/1 codebook groups.
        coefs, chain_src, chain_step, chain_base: the bandwidth plan (mmdkernels/mmd/plan.py), at most 8 bandwidths.
        compute_grad: also return d loss / d z (a second pass over the tiles).
    Returns:
        (loss float32 0-dim, grad float32 [N, K, D] or an empty [0] tensor when compute_grad is False).
    """
    num_samples = z.shape[0]
    sums = mmd_dhsic_sums_triton(z, groups, coefs, chain_src, chain_step, chain_base, 0, num_samples)
    return mmd_dhsic_rows_triton(
        z, groups, coefs, chain_src, chain_step, chain_base, sums, 0, num_samples, compute_grad
    )
