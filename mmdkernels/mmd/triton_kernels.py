# Triton backend of the fused MMD independence loss (contract and maths: docs/mmd_kernels.md). Fused per tile:
# per-codebook squared distances (tl.dot over D in 16-feature chunks, batched over the K codebooks), group distances,
# the bandwidth chain (one exp per entry, the other bandwidths by integer powers), loss values and gradient weights; no
# N x N matrix is stored. Tiling: each program owns BLOCK_N rows and loops over BLOCK_M column tiles (flash-attention
# style); its loss partial, rowsum(W) and W @ B for the row block stay in registers. The xy term's column side is a
# separate launch with X and Y swapped (deterministic, no atomics). Everything is float32, accumulated in float32.

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

BLOCK_N = 16  # rows per program; 16 is tl.dot's smallest tile edge
BLOCK_M = 16  # columns per inner step
CHUNK_D = 16  # features per distance tl.dot step; D is zero-padded to a multiple of it
# 8 warps halve the per-thread share of the [K, BLOCK_N, D] gradient accumulator and the [K, BLOCK_N, BLOCK_M] tiles;
# offline ptxas for sm_90 shows (almost) no register spills with them up to K * D = 512.
NUM_WARPS = 8
MAX_BANDWIDTHS = 8
MAX_CODEBOOKS = 32
# Values of `chain_src` (plan.DIRECT_EXP / plan.FROM_BASE; kDirectExp / kFromBase in csrc/mmd/mmd_tile.h).
DIRECT_EXP = tl.constexpr(-2)
FROM_BASE = tl.constexpr(-1)
# Chain steps are at most plan.MAX_CHAIN_POWER = 1024 < 2**11.
MAX_STEP_BITS = tl.constexpr(11)


class _Plan(NamedTuple):
    """The bandwidth plan as compile-time constants of the kernels."""

    coefs: tuple[float, ...]
    src: tuple[int, ...]
    step: tuple[int, ...]
    base_coef: float


# ---------------------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _int_power(base, EXPONENT: tl.constexpr):
    """base ** EXPONENT by square-and-multiply, unrolled at compile time (the unused squarings are dead code)."""
    result = tl.full(base.shape, 1.0, tl.float32)
    for bit in tl.static_range(MAX_STEP_BITS):
        if (EXPONENT >> bit) & 1:
            result = result * base
        base = base * base
    return result


@triton.jit
def _bandwidth_values(dist, COEFS: tl.constexpr, SRC: tl.constexpr, STEP: tl.constexpr, BASE_COEF: tl.constexpr):
    """Tuple of exp(-COEFS[j] * dist) for every bandwidth j, by the plan's chain (eval_bandwidths in mmd_tile.h)."""
    base = dist  # placeholder, only read when some bandwidth is chained
    if BASE_COEF > 0.0:
        base = tl.exp(-BASE_COEF * dist)
    values = ()
    for j in tl.static_range(len(COEFS)):
        if SRC[j] == DIRECT_EXP:
            value = tl.exp(-COEFS[j] * dist)
        elif SRC[j] == FROM_BASE:
            value = _int_power(base, STEP[j])
        else:
            value = _int_power(values[SRC[j]], STEP[j])
        values = values + (value,)
    return values


@triton.jit
def _load_samples(
    ptr,
    samples,
    feature_start,
    num_samples,
    NUM_CODEBOOKS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Features [feature_start, feature_start + BLOCK_D) of rows `samples` of a [N, K, D] tensor, as a zero-padded
    tile [BLOCK_K, len(samples), BLOCK_D]."""
    codebooks = tl.arange(0, BLOCK_K)[:, None, None]
    features = feature_start + tl.arange(0, BLOCK_D)[None, None, :]
    samples = samples[None, :, None]
    mask = (samples < num_samples) & (codebooks < NUM_CODEBOOKS) & (features < DIM)
    return tl.load(ptr + samples * (NUM_CODEBOOKS * DIM) + codebooks * DIM + features, mask=mask, other=0.0)


@triton.jit
def _store_samples(
    ptr,
    samples,
    tile,
    num_samples,
    NUM_CODEBOOKS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Inverse of _load_samples (feature_start 0) for the rows, codebooks and features that exist."""
    codebooks = tl.arange(0, BLOCK_K)[:, None, None]
    features = tl.arange(0, BLOCK_D)[None, None, :]
    samples = samples[None, :, None]
    mask = (samples < num_samples) & (codebooks < NUM_CODEBOOKS) & (features < DIM)
    tl.store(ptr + samples * (NUM_CODEBOOKS * DIM) + codebooks * DIM + features, tile, mask=mask)


@triton.jit
def _sample_sqnorms(
    ptr,
    samples,
    num_samples,
    NUM_CODEBOOKS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_D: tl.constexpr,
):
    """|z_n^k|^2 for rows `samples`: [BLOCK_K, len(samples)]."""
    norms = tl.zeros([BLOCK_K, samples.shape[0]], tl.float32)
    for feature_start in range(0, DIM, CHUNK_D):
        tile = _load_samples(ptr, samples, feature_start, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
        norms += tl.sum(tile * tile, axis=2)
    return norms


@triton.jit
def _codebook_sqdists(
    rows_ptr,
    row_ids,
    row_norms,
    cols_ptr,
    col_ids,
    num_samples,
    NUM_CODEBOOKS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_D: tl.constexpr,
):
    """d_k(row n, col m) = |a|^2 + |b|^2 - 2 a.b clamped at 0, as [BLOCK_K, len(row_ids), len(col_ids)].

    The dot runs over D in CHUNK_D slices reloaded from memory (cache hits), so no thread holds a whole feature row.
    """
    dots = tl.zeros([BLOCK_K, row_ids.shape[0], col_ids.shape[0]], tl.float32)
    col_norms = tl.zeros([BLOCK_K, col_ids.shape[0]], tl.float32)
    for feature_start in range(0, DIM, CHUNK_D):
        rows = _load_samples(rows_ptr, row_ids, feature_start, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
        cols = _load_samples(cols_ptr, col_ids, feature_start, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
        dots = tl.dot(rows, tl.permute(cols, (0, 2, 1)), acc=dots, input_precision="ieee")
        col_norms += tl.sum(cols * cols, axis=2)
    return tl.maximum(row_norms[:, :, None] + col_norms[:, None, :] - 2.0 * dots, 0.0)


@triton.jit
def _group_members(groups_ptr, group, NUM_CODEBOOKS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row `group` of the 0/1 [G, K] mask as booleans [BLOCK_K] (False for padded codebooks)."""
    codebooks = tl.arange(0, BLOCK_K)
    member = tl.load(groups_ptr + group * NUM_CODEBOOKS + codebooks, mask=codebooks < NUM_CODEBOOKS, other=0)
    return member != 0


@triton.jit
def _group_kernel_sums(
    dists,
    groups_ptr,
    num_groups,
    NUM_CODEBOOKS: tl.constexpr,
    COEFS: tl.constexpr,
    SRC: tl.constexpr,
    STEP: tl.constexpr,
    BASE_COEF: tl.constexpr,
    COMPUTE_SLOPES: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Kernel values and slopes of the group distances D_g = sum_{k in g} dists[k] (dists [BK, BN, BM]).

    Returns values [BN, BM] = sum_{g, j} e_j(D_g) and slopes [BK, BN, BM] = sum_{g contains k} sum_j -coef_j e_j(D_g)
    (zeros unless COMPUTE_SLOPES).
    """
    values = tl.zeros(dists.shape[1:], tl.float32)
    slopes = tl.zeros(dists.shape, tl.float32)
    for group in range(num_groups):
        member = _group_members(groups_ptr, group, NUM_CODEBOOKS, BLOCK_K)[:, None, None]
        group_dist = tl.sum(tl.where(member, dists, 0.0), axis=0)
        bandwidths = _bandwidth_values(group_dist, COEFS, SRC, STEP, BASE_COEF)
        group_value = bandwidths[0]
        group_slope = -COEFS[0] * bandwidths[0]
        for j in tl.static_range(1, len(COEFS)):
            group_value += bandwidths[j]
            group_slope -= COEFS[j] * bandwidths[j]
        values += group_value
        if COMPUTE_SLOPES:
            slopes += tl.where(member, group_slope[None, :, :], 0.0)
    return values, slopes


@triton.jit
def _row_block_grad(
    grad_ptr,
    rows_ptr,
    row_ids,
    weight_rowsums,
    weighted_cols,
    num_samples,
    NUM_CODEBOOKS: tl.constexpr,
    DIM: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad rows (+)= rowsum(W) * A - W @ B for the row block, from the accumulated rowsum(W) and W @ B."""
    rows = _load_samples(rows_ptr, row_ids, 0, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, BLOCK_D)
    grad = weight_rowsums[:, :, None] * rows - weighted_cols
    if ACCUMULATE:
        grad += _load_samples(grad_ptr, row_ids, 0, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, BLOCK_D)
    _store_samples(grad_ptr, row_ids, grad, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, BLOCK_D)


# ---------------------------------------------------------------------------------------------------------------------
# mmd_shuffle
# ---------------------------------------------------------------------------------------------------------------------


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
    COMPUTE_GRAD: tl.constexpr,
    ACCUMULATE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One term of the shuffle loss, rows A (a block of those in [row_begin, row_end)) against all columns B.

    loss_ptr[pid] = w sum_{n in block, m (!= n if SYMMETRIC)} sum_{g, j} e_j(D_g(a_n, b_m)).
    grad_ptr rows (+)= d/dA: 4 (SYMMETRIC: A is B, both orders) or 2 times (rowsum(W) A - W @ B).
    """
    row_ids = row_begin + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_norms = _sample_sqnorms(rows_ptr, row_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
    grad_scale = 4.0 if SYMMETRIC else 2.0
    loss = tl.zeros([], tl.float32)
    weight_rowsums = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    weighted_cols = tl.zeros([BLOCK_K, BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, num_samples, BLOCK_M):
        col_ids = start + tl.arange(0, BLOCK_M)
        valid = (row_ids[:, None] < row_end) & (col_ids[None, :] < num_samples)
        if SYMMETRIC:
            # the diagonal is excluded by index, never by its computed distance (not exactly 0 in float32)
            valid = valid & (row_ids[:, None] != col_ids[None, :])
        dists = _codebook_sqdists(
            rows_ptr, row_ids, row_norms, cols_ptr, col_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D
        )
        values, slopes = _group_kernel_sums(
            dists, groups_ptr, num_groups, NUM_CODEBOOKS, COEFS, SRC, STEP, BASE_COEF, COMPUTE_GRAD, BLOCK_K
        )
        loss += tl.sum(tl.where(valid, values, 0.0))
        if COMPUTE_GRAD:
            weights = tl.where(valid[None, :, :], (grad_scale * term_weight) * slopes, 0.0)
            cols = _load_samples(cols_ptr, col_ids, 0, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, BLOCK_D)
            weight_rowsums += tl.sum(weights, axis=2)
            weighted_cols = tl.dot(weights, cols, acc=weighted_cols, input_precision="ieee")
    tl.store(loss_ptr + tl.program_id(0), term_weight * loss)
    if COMPUTE_GRAD:
        _row_block_grad(
            grad_ptr,
            rows_ptr,
            row_ids,
            weight_rowsums,
            weighted_cols,
            row_end,
            NUM_CODEBOOKS,
            DIM,
            ACCUMULATE_GRAD,
            BLOCK_K,
            BLOCK_D,
        )


# ---------------------------------------------------------------------------------------------------------------------
# mmd_dhsic
# ---------------------------------------------------------------------------------------------------------------------


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
    dists = _codebook_sqdists(
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
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_D: tl.constexpr,
):
    """Pass 1: row_sums[j, k, n] = sum_m E_{k,j}(n, m) for the block's rows ([J, K, N], J bandwidths); joint[pid] =
    sum over the block's rows, all columns, groups and bandwidths of prod_{k in g} E_{k,j}(n, m) = e_j(D_g(n, m)).
    The blocks cover the rows [row_begin, row_end)."""
    row_ids = row_begin + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_norms = _sample_sqnorms(z_ptr, row_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
    joint = tl.zeros([], tl.float32)
    row_sums = ()
    for j in tl.static_range(len(COEFS)):
        row_sums = row_sums + (tl.zeros([BLOCK_K, BLOCK_N], tl.float32),)
    for start in range(0, num_samples, BLOCK_M):
        col_ids = start + tl.arange(0, BLOCK_M)
        valid = (row_ids[:, None] < row_end) & (col_ids[None, :] < num_samples)
        dists = _dhsic_dists(z_ptr, row_ids, row_norms, col_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
        grams = _bandwidth_values(dists, COEFS, SRC, STEP, BASE_COEF)
        new_row_sums = ()
        for j in tl.static_range(len(COEFS)):
            new_row_sums = new_row_sums + (row_sums[j] + tl.sum(tl.where(valid[None, :, :], grams[j], 0.0), axis=2),)
        row_sums = new_row_sums
        joint_values, _ = _group_kernel_sums(
            dists, groups_ptr, num_groups, NUM_CODEBOOKS, COEFS, SRC, STEP, BASE_COEF, False, BLOCK_K
        )
        joint += tl.sum(tl.where(valid, joint_values, 0.0))
    tl.store(joint_ptr + tl.program_id(0), joint)
    codebooks = tl.arange(0, BLOCK_K)[:, None]
    mask = (codebooks < NUM_CODEBOOKS) & (row_ids[None, :] < row_end)
    for j in tl.static_range(len(COEFS)):
        offsets = (j * NUM_CODEBOOKS + codebooks) * num_samples + row_ids[None, :]
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
        member = _group_members(groups_ptr, group, NUM_CODEBOOKS, BLOCK_K)[:, None, None]
        bandwidths = _bandwidth_values(tl.sum(tl.where(member, dists, 0.0), axis=0), COEFS, SRC, STEP, BASE_COEF)
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
def _load_codebook_stat(ptr, bandwidth, samples, num_samples, NUM_CODEBOOKS: tl.constexpr, BLOCK_K: tl.constexpr):
    """stat[bandwidth, :, samples] of a [J, K, N] tensor as [BLOCK_K, len(samples)], 0 where out of range."""
    codebooks = tl.arange(0, BLOCK_K)[:, None]
    mask = (codebooks < NUM_CODEBOOKS) & (samples[None, :] < num_samples)
    offsets = (bandwidth * NUM_CODEBOOKS + codebooks) * num_samples + samples[None, :]
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
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pass 2: grad rows = 2 (rowsum(W) z - W @ z) with W the symmetrised dHSIC weight (dhsic_entry_weight).

    gamma_ptr: [J, K]; beta_ptr: [J, K, N] (J bandwidths), from pass 1's statistics. Rows [row_begin, row_end).
    """
    row_ids = row_begin + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_norms = _sample_sqnorms(z_ptr, row_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
    codebooks = tl.arange(0, BLOCK_K)
    two_gammas = ()
    row_betas = ()
    for j in tl.static_range(len(COEFS)):
        gamma = tl.load(gamma_ptr + j * NUM_CODEBOOKS + codebooks, mask=codebooks < NUM_CODEBOOKS, other=0.0)
        two_gammas = two_gammas + (2.0 * gamma,)
        row_betas = row_betas + (_load_codebook_stat(beta_ptr, j, row_ids, num_samples, NUM_CODEBOOKS, BLOCK_K),)
    weight_rowsums = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    weighted_cols = tl.zeros([BLOCK_K, BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, num_samples, BLOCK_M):
        col_ids = start + tl.arange(0, BLOCK_M)
        valid = (row_ids[:, None] < row_end) & (col_ids[None, :] < num_samples)
        dists = _dhsic_dists(z_ptr, row_ids, row_norms, col_ids, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
        grams = _bandwidth_values(dists, COEFS, SRC, STEP, BASE_COEF)
        joint_sums = _group_joint_sums(
            dists, groups_ptr, num_groups, NUM_CODEBOOKS, COEFS, SRC, STEP, BASE_COEF, BLOCK_K
        )
        weights = tl.zeros(dists.shape, tl.float32)
        for j in tl.static_range(len(COEFS)):
            col_betas = _load_codebook_stat(beta_ptr, j, col_ids, num_samples, NUM_CODEBOOKS, BLOCK_K)
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
        cols = _load_samples(z_ptr, col_ids, 0, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, BLOCK_D)
        weight_rowsums += tl.sum(weights, axis=2)
        weighted_cols = tl.dot(weights, cols, acc=weighted_cols, input_precision="ieee")
    _row_block_grad(
        grad_ptr,
        z_ptr,
        row_ids,
        weight_rowsums,
        weighted_cols,
        row_end,
        NUM_CODEBOOKS,
        DIM,
        False,
        BLOCK_K,
        BLOCK_D,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------------


def _make_plan(coefs: Sequence[float], chain_src: Sequence[int], chain_step: Sequence[int], chain_base: float) -> _Plan:
    count = len(coefs)
    if not 1 <= count <= MAX_BANDWIDTHS or len(chain_src) != count or len(chain_step) != count:
        raise ValueError(f"bandwidth plan needs 1..{MAX_BANDWIDTHS} coefs with one src and step each")
    for j, (src, step) in enumerate(zip(chain_src, chain_step)):
        if not (src in (DIRECT_EXP.value, FROM_BASE.value) or 0 <= src < j) or not 1 <= step < 2**MAX_STEP_BITS.value:
            raise ValueError(f"bandwidth {j}: invalid chain src {src} / step {step}")
    if FROM_BASE.value in chain_src and not chain_base > 0.0:
        raise ValueError(f"bandwidths chained from the base need chain_base > 0, got {chain_base}")
    return _Plan(
        tuple(float(c) for c in coefs),
        tuple(int(s) for s in chain_src),
        tuple(int(s) for s in chain_step),
        float(chain_base),
    )


def _check_samples(z: torch.Tensor, groups: torch.Tensor) -> None:
    if z.dtype != torch.float32 or z.dim() != 3 or not z.is_contiguous():
        raise ValueError(f"z must be a contiguous float32 [N, K, D] tensor, got {z.dtype} {tuple(z.shape)}")
    num_codebooks = z.shape[1]
    if not 1 <= num_codebooks <= MAX_CODEBOOKS:
        raise ValueError(f"K = {num_codebooks}: the Triton kernels support 1..{MAX_CODEBOOKS} codebooks")
    if groups.dim() != 2 or groups.shape[1] != num_codebooks:
        raise ValueError(f"groups must be [G, {num_codebooks}], got {tuple(groups.shape)}")
    if z.numel() >= 2**31:
        raise ValueError("z is too large for the kernels' int32 offsets")


def _check_perms(perms: torch.Tensor, z: torch.Tensor) -> None:
    if perms.dtype != torch.int64 or tuple(perms.shape) != (z.shape[1], z.shape[0]):
        raise ValueError(
            f"perms must be int64 [K, N] = [{z.shape[1]}, {z.shape[0]}], got {perms.dtype} {tuple(perms.shape)}"
        )


def _plan_kwargs(plan: _Plan) -> dict:
    return {"COEFS": plan.coefs, "SRC": plan.src, "STEP": plan.step, "BASE_COEF": plan.base_coef}


def _shape_kwargs(z: torch.Tensor) -> dict:
    return {
        "NUM_CODEBOOKS": z.shape[1],
        "DIM": z.shape[2],
        "BLOCK_N": BLOCK_N,
        "BLOCK_M": BLOCK_M,
        "BLOCK_K": triton.next_power_of_2(z.shape[1]),
        "CHUNK_D": CHUNK_D,
    }


def _grad_block_d(z: torch.Tensor) -> int:
    """Width of the gradient accumulator tile: all D features, padded to a power of two (at least tl.dot's 16)."""
    return max(CHUNK_D, triton.next_power_of_2(z.shape[2]))


def _num_row_blocks(num_samples: int) -> int:
    return triton.cdiv(num_samples, BLOCK_N)


def _nan_filled(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.full(tuple(shape), float("nan"), dtype=torch.float32, device=like.device)


def _row_range(num_samples: int, row_range: tuple[int, int] | None) -> tuple[int, int]:
    row_begin, row_end = (0, num_samples) if row_range is None else (int(row_range[0]), int(row_range[1]))
    if row_end < 0:
        row_end = num_samples
    if not 0 <= row_begin <= row_end <= num_samples:
        raise ValueError(f"row range must satisfy 0 <= row_begin <= row_end <= N = {num_samples}, got {row_range}")
    return row_begin, row_end


def _grad_buffer(z: torch.Tensor, full_range: bool) -> torch.Tensor:
    """Every row of the gradient is written when the range is all rows (NaN-filled catches a missed one), else the
    rows outside the range must hold 0."""
    return _nan_filled(z.shape, z) if full_range else torch.zeros_like(z)


def _shuffle_term(
    rows: torch.Tensor,
    cols: torch.Tensor,
    groups: torch.Tensor,
    plan: _Plan,
    weight: float,
    symmetric: bool,
    grad: torch.Tensor | None,
    accumulate_grad: bool,
    row_range: tuple[int, int],
) -> torch.Tensor:
    """Launches _shuffle_term_kernel on the rows in row_range; writes (or adds) d term / d rows into `grad` unless
    it is None.

    Returns the term's loss partials, one per row block.
    """
    num_blocks = _num_row_blocks(row_range[1] - row_range[0])
    partials = _nan_filled((num_blocks,), rows)
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
        COMPUTE_GRAD=grad is not None,
        ACCUMULATE_GRAD=accumulate_grad,
        BLOCK_D=_grad_block_d(rows),
        num_warps=NUM_WARPS,
        **_plan_kwargs(plan),
        **_shape_kwargs(rows),
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
    _check_samples(z, groups)
    _check_perms(perms, z)
    plan = _make_plan(coefs, chain_src, chain_step, chain_base)
    rows = _row_range(z.shape[0], row_range)
    full_range = rows == (0, z.shape[0])
    groups = groups.to(device=z.device, dtype=torch.int32).contiguous()
    w_xx, w_yy, w_xy = (float(w) for w in term_weights)
    codebook_ids = torch.arange(z.shape[1], device=z.device)
    y = z[perms, codebook_ids[:, None]].transpose(0, 1).contiguous()
    grad_x = _grad_buffer(z, full_range) if compute_grad else None
    grad_y = _grad_buffer(z, full_range) if compute_grad else None
    partials = torch.cat(
        [
            _shuffle_term(z, z, groups, plan, w_xx, symmetric=True, grad=grad_x, accumulate_grad=False, row_range=rows),
            _shuffle_term(z, y, groups, plan, w_xy, symmetric=False, grad=grad_x, accumulate_grad=True, row_range=rows),
            _shuffle_term(y, y, groups, plan, w_yy, symmetric=True, grad=grad_y, accumulate_grad=False, row_range=rows),
        ]
    )
    loss = partials.double().sum()
    if row_range is None:
        loss = loss.float()
    if not compute_grad:
        return loss, z.new_empty(0)
    # The xy term's column side: the same term with rows Y and columns X (its loss is already counted). With a row
    # range this is the column side of Y's rows in the range, so the ranges of all ranks together cover it once.
    _shuffle_term(y, z, groups, plan, w_xy, symmetric=False, grad=grad_y, accumulate_grad=True, row_range=rows)
    # grad[perms[k, m], k] += grad_y[m, k]
    return loss, grad_x.scatter_add_(0, perms.t()[:, :, None].expand_as(grad_y), grad_y)


class _DhsicStats(NamedTuple):
    loss: torch.Tensor  # float32 0-dim
    gamma: torch.Tensor  # float32 [J, K]
    beta: torch.Tensor  # float32 [J, K, N]


def _dhsic_stats(row_sums: torch.Tensor, joint_total: torch.Tensor, groups: torch.Tensor) -> _DhsicStats:
    """Loss and gradient statistics from pass 1, in float64 (O(G J N) work).

    row_sums: float64 [J, K, N] sums of E_{k,j} over columns; joint_total: float64 [] the joint sum. Group products
    prod_{k in g} go through logs: every row mean is at least 1/N (the diagonal entry is exactly 1), so the logs are
    finite.
    """
    num_samples = row_sums.shape[2]
    inv_n2 = 1.0 / float(num_samples) ** 2
    members = groups.double()
    row_means = row_sums / num_samples
    means = row_means.mean(dim=2)
    row_products = torch.exp(torch.einsum("gk,jkn->jgn", members, row_means.log()))  # [J, G, N]
    mean_products = torch.exp(means.log() @ members.t())  # [J, G]
    loss = joint_total * inv_n2 + mean_products.sum() - (2.0 / num_samples) * row_products.sum()
    # prod_{i in g, i != k} = prod_{i in g} / (factor k), summed over the groups that contain k
    gamma = inv_n2 * (mean_products @ members) / means
    beta = 2.0 * inv_n2 * torch.einsum("jgn,gk->jkn", row_products, members) / row_means
    return _DhsicStats(loss.float(), gamma.float().contiguous(), beta.float().contiguous())


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
        float64 [K*J + 1, N]: row k*J + j = sum_m E_{k,j}(n, m) for n in the range (0 elsewhere); the last row holds
        the range's joint sum in column 0 (only its total is used).
    """
    _check_samples(z, groups)
    plan = _make_plan(coefs, chain_src, chain_step, chain_base)
    row_begin, row_end = _row_range(z.shape[0], (row_begin, row_end))
    groups = groups.to(device=z.device, dtype=torch.int32).contiguous()
    num_samples, num_codebooks, _ = z.shape
    num_bandwidths = len(plan.coefs)
    num_blocks = _num_row_blocks(row_end - row_begin)
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
            num_warps=NUM_WARPS,
            **_plan_kwargs(plan),
            **_shape_kwargs(z),
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
    """The dHSIC loss from the pass-1 sums of ALL rows, and the gradient of the rows [row_begin, row_end)
    (contract of mmdkernels::mmd_dhsic_rows).

    Returns:
        (loss float32 0-dim, grad float32 [N, K, D] (0 outside the range) or an empty [0] tensor).
    """
    _check_samples(z, groups)
    plan = _make_plan(coefs, chain_src, chain_step, chain_base)
    row_begin, row_end = _row_range(z.shape[0], (row_begin, row_end))
    groups = groups.to(device=z.device, dtype=torch.int32).contiguous()
    num_samples, num_codebooks, _ = z.shape
    num_bandwidths = len(plan.coefs)
    if sums.dtype != torch.float64 or tuple(sums.shape) != (num_codebooks * num_bandwidths + 1, num_samples):
        raise ValueError(
            f"sums must be float64 [K*J + 1, N] = [{num_codebooks * num_bandwidths + 1}, {num_samples}], "
            f"got {sums.dtype} {tuple(sums.shape)}"
        )
    row_sums = sums[:-1].reshape(num_codebooks, num_bandwidths, num_samples).transpose(0, 1)
    stats = _dhsic_stats(row_sums, sums[-1].sum(), groups)
    if not compute_grad:
        return stats.loss, z.new_empty(0)
    full_range = (row_begin, row_end) == (0, num_samples)
    grad = _grad_buffer(z, full_range)
    num_blocks = _num_row_blocks(row_end - row_begin)
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
        1.0 / float(num_samples) ** 2,
        BLOCK_D=_grad_block_d(z),
        num_warps=NUM_WARPS,
        **_plan_kwargs(plan),
        **_shape_kwargs(z),
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
