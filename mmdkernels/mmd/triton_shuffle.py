# Triton kernel of the shuffle estimator (mmd_shuffle, mmd_shuffle_rows; contract and maths: docs/mmd_kernels.md).
# Fused per tile: per-codebook squared distances, group distances, the bandwidth chain, loss values and gradient
# weights (triton_common.py); no N x N matrix is stored. Tiling: each program owns BLOCK_N rows and loops over
# BLOCK_M column tiles (flash-attention style); its loss partial, rowsum(W) and W @ B for the row block stay in
# registers. The symmetric xx and yy terms visit each unordered pair of blocks once (a row block's diagonal and owned
# blocks, the mirrored tiles' column sides by atomics; every tile under torch.use_deterministic_algorithms: see
# triton_common.py). The xy term's column side is a separate launch with X and Y swapped (no atomics).
# Everything is float32, accumulated in float32; the loss partials of the row blocks are summed in float64.

from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from mmdkernels.mmd.triton_common import (
    NUM_WARPS,
    Plan,
    check_groups,
    check_perms,
    check_row_range,
    check_samples,
    codebook_sqdists,
    column_block,
    column_steps,
    grad_block_d,
    grad_buffer,
    group_kernel_sums,
    load_samples,
    make_plan,
    mirrored_column_grad,
    mirrored_tiles,
    nan_filled,
    num_row_blocks,
    pair_copies,
    plan_kwargs,
    row_block_grad,
    sample_sqnorms,
    shape_kwargs,
)


@triton.jit
def _shuffle_term_kernel(
    rows_ptr,
    cols_ptr,
    groups_ptr,
    loss_ptr,
    grad_ptr,
    num_samples,
    row_begin,
    row_end,
    num_groups,
    term_weight,
    NUM_CODEBOOKS: tl.constexpr,
    DIM: tl.constexpr,
    COEFS: tl.constexpr,
    SRC: tl.constexpr,
    STEP: tl.constexpr,
    BASE_COEF: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    MIRRORED: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ACCUMULATE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One term of the shuffle loss for one row block (block row_begin // BLOCK_N + pid of the BLOCK_N-row grid): its
    rows A in [row_begin, row_end) against the columns B, all of them or (MIRRORED, a symmetric term) the diagonal
    block and the blocks it owns (csrc/mmd/block_pairs.h), whose entries stand for their transposes too.

    loss_ptr[pid] = w sum_{visited n, m (!= n if SYMMETRIC)} copies sum_{g, j} e_j(D_g(a_n, b_m)), copies = 2 on a
    mirrored tile, else 1.
    grad_ptr rows (+)= d/dA: 4 (SYMMETRIC: A is B, both orders) or 2 times (rowsum(W) A - W @ B); MIRRORED: a mirrored
    tile's columns also get 4 (colsum(W) B - W^T @ A), and every side is added by atomics.
    """
    block = row_begin // BLOCK_N + tl.program_id(0)
    row_ids = block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = (row_ids >= row_begin) & (row_ids < row_end)
    row_norms = sample_sqnorms(rows_ptr, row_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
    grad_scale = 4.0 if SYMMETRIC else 2.0
    loss = tl.zeros([], tl.float32)
    weight_rowsums = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    weighted_cols = tl.zeros([BLOCK_K, BLOCK_N, BLOCK_D], tl.float32)
    num_blocks = tl.cdiv(num_samples, BLOCK_M)
    for step in range(0, column_steps(block, num_blocks, MIRRORED)):
        col_ids = column_block(block, step, num_blocks, MIRRORED) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = in_rows[:, None] & (col_ids[None, :] < num_samples)
        if SYMMETRIC:
            # the diagonal is excluded by index, never by its computed distance (not exactly 0 in float32)
            valid = valid & (row_ids[:, None] != col_ids[None, :])
        dists = codebook_sqdists(
            rows_ptr, row_ids, row_norms, cols_ptr, col_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D
        )
        values, slopes = group_kernel_sums(
            dists, groups_ptr, num_groups, NUM_CODEBOOKS, COEFS, SRC, STEP, BASE_COEF, COMPUTE_GRAD, BLOCK_K
        )
        loss += pair_copies(step, MIRRORED) * tl.sum(tl.where(valid, values, 0.0))
        if COMPUTE_GRAD:
            weights = tl.where(valid[None, :, :], (grad_scale * term_weight) * slopes, 0.0)
            cols = load_samples(cols_ptr, col_ids, 0, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, BLOCK_D)
            weight_rowsums += tl.sum(weights, axis=2)
            weighted_cols = tl.dot(weights, cols, acc=weighted_cols, input_precision="ieee")
            if MIRRORED:
                if step > 0:
                    mirrored_column_grad(
                        grad_ptr, rows_ptr, row_ids, weights, cols, col_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K,
                        BLOCK_D,
                    )
    tl.store(loss_ptr + tl.program_id(0), term_weight * loss)
    if COMPUTE_GRAD:
        row_block_grad(
            grad_ptr,
            rows_ptr,
            row_ids,
            in_rows,
            weight_rowsums,
            weighted_cols,
            num_samples,
            NUM_CODEBOOKS,
            DIM,
            ACCUMULATE_GRAD,
            MIRRORED,
            BLOCK_K,
            BLOCK_D,
        )


def _shuffle_term(
    rows: torch.Tensor,
    cols: torch.Tensor,
    groups: torch.Tensor,
    plan: Plan,
    weight: float,
    symmetric: bool,
    mirrored: bool,
    grad: torch.Tensor | None,
    accumulate_grad: bool,
    row_range: tuple[int, int],
) -> torch.Tensor:
    """Launches _shuffle_term_kernel on the rows in row_range (a symmetric term once per block pair if `mirrored`);
    writes (or adds; mirrored: adds by atomics) d term / d samples into `grad` unless it is None.

    Returns the term's loss partials, one per row block.
    """
    num_blocks = num_row_blocks(*row_range)
    partials = nan_filled((num_blocks,), rows)
    if num_blocks == 0:
        return partials
    _shuffle_term_kernel[(num_blocks,)](
        rows,
        cols,
        groups,
        partials,
        partials if grad is None else grad,
        rows.shape[0],
        row_range[0],
        row_range[1],
        groups.shape[0],
        weight,
        SYMMETRIC=symmetric,
        MIRRORED=symmetric and mirrored,
        COMPUTE_GRAD=grad is not None,
        ACCUMULATE_GRAD=accumulate_grad and not (symmetric and mirrored),
        BLOCK_D=grad_block_d(rows),
        num_warps=NUM_WARPS,
        **plan_kwargs(plan),
        **shape_kwargs(rows),
    )
    return partials


def mmd_shuffle_triton(
    z: torch.Tensor,
    perms: torch.Tensor,
    groups: torch.Tensor,
    coefs: Sequence[float],
    chain_src: Sequence[int],
    chain_step: Sequence[int],
    chain_base: float,
    term_weights: Sequence[float],
    compute_grad: bool,
    row_range: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused shuffle-estimator sums (spec: reference.shuffle_sums_ref) and their gradient.

    Args:
        z: float32 [N, K, D], contiguous (CUDA, or CPU under TRITON_INTERPRET=1).
        perms: int64 [K, N]; Y[m, k] = z[perms[k, m], k].
        groups: int32 [G, K] 0/1 codebook groups.
        coefs, chain_src, chain_step, chain_base: the bandwidth plan (mmdkernels/mmd/plan.py), at most 8 bandwidths.
        term_weights: [w_xx, w_yy, w_xy].
        compute_grad: also return d loss / d z.
        row_range: (row_begin, row_end): only the entries of those rows, against every column (mmd_shuffle_rows).
    Returns:
        (loss 0-dim: float32, or the float64 partial sum with a row_range; grad float32 [N, K, D] (with a row_range,
        the gradient of the partial sum for all N samples) or an empty [0] tensor when compute_grad is False).
    """
    check_samples(z)
    check_perms(perms, z)
    check_groups(groups, z)
    if len(term_weights) != 3:
        raise ValueError(f"term_weights must be [w_xx, w_yy, w_xy], got {len(term_weights)} values")
    plan = make_plan(coefs, chain_src, chain_step, chain_base)
    rows = check_row_range(z.shape[0], *((0, -1) if row_range is None else row_range))
    full_range = rows == (0, z.shape[0])
    groups = groups.contiguous()
    w_xx, w_yy, w_xy = (float(w) for w in term_weights)
    codebook_ids = torch.arange(z.shape[1], device=z.device)
    y = z[perms, codebook_ids[:, None]].transpose(0, 1).contiguous()
    mirrored = mirrored_tiles()
    grad_x = grad_buffer(z, full_range, atomic=mirrored) if compute_grad else None
    grad_y = grad_buffer(z, full_range, atomic=mirrored) if compute_grad else None
    term = functools.partial(_shuffle_term, groups=groups, plan=plan, mirrored=mirrored, row_range=rows)
    partials = torch.cat(
        [
            term(z, z, weight=w_xx, symmetric=True, grad=grad_x, accumulate_grad=False),
            term(z, y, weight=w_xy, symmetric=False, grad=grad_x, accumulate_grad=True),
            term(y, y, weight=w_yy, symmetric=True, grad=grad_y, accumulate_grad=False),
        ]
    )
    loss = partials.double().sum()
    if row_range is None:
        loss = loss.float()
    if not compute_grad:
        return loss, z.new_empty(0)
    # The xy term's column side: the same term with rows Y and columns X (its loss is already counted). With a row
    # range this is the column side of Y's rows in the range, so the ranges of all ranks together cover it once.
    term(y, z, weight=w_xy, symmetric=False, grad=grad_y, accumulate_grad=True)
    # grad[perms[k, m], k] += grad_y[m, k]
    return loss, grad_x.scatter_add_(0, perms.t()[:, :, None].expand_as(grad_y), grad_y)
