"""Shared parts of the Triton MMD kernels (triton_shuffle.py, triton_dhsic.py): tile sizes, the op-argument checks
and bandwidth plan (the contract of csrc/mmd/mmd_args.h, docs/mmd_kernels.md "Inputs"), and the device helpers both
estimators fuse per tile: per-codebook squared distances (tl.dot over D in CHUNK_D-feature slices, batched over the
K codebooks), group distances, the bandwidth chain (one exp per entry, the other bandwidths by integer powers, as
eval_bandwidths in csrc/mmd/mmd_tile.h), the row block's gradient, and the walk of a symmetric plane once per unordered
pair of blocks (csrc/mmd/block_pairs.h). Everything is float32, accumulated in float32.

Symmetric planes (the shuffle's xx and yy terms, dHSIC's Grams): by default a row block visits its diagonal block and
the column blocks it owns; such a "mirrored" tile counts twice and adds its column side (gradient, dHSIC's Gram sums)
to the column block's rows by float32 atomics, so the row sides are atomic too. A deterministic column side would
need a [blocks owned, N, K, D] buffer or a wave of launches per block offset: 16 rows of K x D output per 16 x 16
tile written to DRAM and read back, by estimate about as costly as the tile work the mirroring saves, while the
atomics add into L2-resident gradients. So gradients (and dHSIC's loss, through its pass-1 sums) vary in the last
bits from run to run; under torch.use_deterministic_algorithms(True) the kernels walk every tile of the plane, row
side only, as before: reproducible bit for bit, at the full plane's cost.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from mmdkernels.mmd.plan import MAX_CHAIN_POWER

BLOCK_N = 16  # rows per program; 16 is tl.dot's smallest tile edge
BLOCK_M = 16  # columns per inner step; = BLOCK_N, as a symmetric plane's column blocks are its row blocks
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


class Plan(NamedTuple):
    """The bandwidth plan as compile-time constants of the kernels."""

    coefs: tuple[float, ...]
    src: tuple[int, ...]
    step: tuple[int, ...]
    base_coef: float


# ---------------------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def int_power(base, EXPONENT: tl.constexpr):
    """base ** EXPONENT by square-and-multiply, unrolled at compile time (the unused squarings are dead code)."""
    result = tl.full(base.shape, 1.0, tl.float32)
    for bit in tl.static_range(MAX_STEP_BITS):
        if (EXPONENT >> bit) & 1:
            result = result * base
        base = base * base
    return result


@triton.jit
def bandwidth_values(dist, COEFS: tl.constexpr, SRC: tl.constexpr, STEP: tl.constexpr, BASE_COEF: tl.constexpr):
    """Tuple of exp(-COEFS[j] * dist) for every bandwidth j, by the plan's chain (eval_bandwidths in mmd_tile.h)."""
    base = dist  # placeholder, only read when some bandwidth is chained
    if BASE_COEF > 0.0:
        base = tl.exp(-BASE_COEF * dist)
    values = ()
    for j in tl.static_range(len(COEFS)):
        if SRC[j] == DIRECT_EXP:
            value = tl.exp(-COEFS[j] * dist)
        elif SRC[j] == FROM_BASE:
            value = int_power(base, STEP[j])
        else:
            value = int_power(values[SRC[j]], STEP[j])
        values = values + (value,)
    return values


@triton.jit
def owned_offsets(block, num_blocks):
    """Off-diagonal column blocks that row block `block` of `num_blocks` owns (csrc/mmd/block_pairs.h): every unordered
    pair of blocks once, every row block about half."""
    # tensor operands first: num_blocks may be a compile-time constant (Triton specialises an argument equal to 1)
    return ((block < num_blocks // 2) & (num_blocks % 2 == 0)).to(tl.int32) + (num_blocks - 1) // 2


@triton.jit
def column_steps(block, num_blocks, MIRRORED: tl.constexpr):
    """How many column blocks row block `block` visits: all of them, or (MIRRORED) its diagonal and owned blocks."""
    steps = 0 * block + num_blocks
    if MIRRORED:
        steps = 1 + owned_offsets(block, num_blocks)
    return steps


@triton.jit
def column_block(block, step, num_blocks, MIRRORED: tl.constexpr):
    """The column block of a row block's step: the step itself, or (MIRRORED) the owned block `step` after the
    diagonal (step 0), cyclically (owned_column_block in block_pairs.h)."""
    col = step + 0 * block
    if MIRRORED:
        col = (block + step) % num_blocks
    return col


@triton.jit
def pair_copies(step, MIRRORED: tl.constexpr):
    """How many entries of the plane a computed entry stands for: 2 on a mirrored tile (its transpose), else 1."""
    copies = tl.full([], 1.0, tl.float32)
    if MIRRORED:
        copies = tl.where(step > 0, 2.0, 1.0)
    return copies


@triton.jit
def load_samples(
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
def store_samples(
    ptr,
    samples,
    tile,
    in_range,
    NUM_CODEBOOKS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """Inverse of load_samples (feature_start 0) for the rows where in_range holds and the codebooks and features that
    exist; ATOMIC: adds the tile by float32 atomics instead."""
    codebooks = tl.arange(0, BLOCK_K)[:, None, None]
    features = tl.arange(0, BLOCK_D)[None, None, :]
    mask = in_range[None, :, None] & (codebooks < NUM_CODEBOOKS) & (features < DIM)
    offsets = samples[None, :, None] * (NUM_CODEBOOKS * DIM) + codebooks * DIM + features
    if ATOMIC:
        tl.atomic_add(ptr + offsets, tile, mask=mask)
    else:
        tl.store(ptr + offsets, tile, mask=mask)


@triton.jit
def sample_sqnorms(
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
        tile = load_samples(ptr, samples, feature_start, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
        norms += tl.sum(tile * tile, axis=2)
    return norms


@triton.jit
def codebook_sqdists(
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
        rows = load_samples(rows_ptr, row_ids, feature_start, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
        cols = load_samples(cols_ptr, col_ids, feature_start, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, CHUNK_D)
        dots = tl.dot(rows, tl.permute(cols, (0, 2, 1)), acc=dots, input_precision="ieee")
        col_norms += tl.sum(cols * cols, axis=2)
    return tl.maximum(row_norms[:, :, None] + col_norms[:, None, :] - 2.0 * dots, 0.0)


@triton.jit
def group_members(groups_ptr, group, NUM_CODEBOOKS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row `group` of the 0/1 [G, K] mask as booleans [BLOCK_K] (False for padded codebooks)."""
    codebooks = tl.arange(0, BLOCK_K)
    member = tl.load(groups_ptr + group * NUM_CODEBOOKS + codebooks, mask=codebooks < NUM_CODEBOOKS, other=0)
    return member != 0


@triton.jit
def group_kernel_sums(
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
        member = group_members(groups_ptr, group, NUM_CODEBOOKS, BLOCK_K)[:, None, None]
        group_dist = tl.sum(tl.where(member, dists, 0.0), axis=0)
        bandwidths = bandwidth_values(group_dist, COEFS, SRC, STEP, BASE_COEF)
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
def row_block_grad(
    grad_ptr,
    rows_ptr,
    row_ids,
    in_rows,
    weight_rowsums,
    weighted_cols,
    num_samples,
    NUM_CODEBOOKS: tl.constexpr,
    DIM: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad rows (+)= rowsum(W) * A - W @ B for the row block's rows in range (in_rows), from the accumulated rowsum(W)
    and W @ B. ATOMIC: added by float32 atomics, as other programs add mirrored column sides to the same rows."""
    rows = load_samples(rows_ptr, row_ids, 0, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, BLOCK_D)
    grad = weight_rowsums[:, :, None] * rows - weighted_cols
    if ACCUMULATE:
        grad += load_samples(grad_ptr, row_ids, 0, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, BLOCK_D)
    store_samples(grad_ptr, row_ids, grad, in_rows, NUM_CODEBOOKS, DIM, BLOCK_K, BLOCK_D, ATOMIC)


@triton.jit
def mirrored_column_grad(
    grad_ptr,
    rows_ptr,
    row_ids,
    weights,
    cols,
    col_ids,
    num_samples,
    NUM_CODEBOOKS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """A mirrored tile's column side: grad[col_ids] += colsum(W) * B - W^T @ A by float32 atomics (weights
    [BK, BN, BM], already scaled and 0 off range; cols = B [BK, BM, BD])."""
    rows = load_samples(rows_ptr, row_ids, 0, num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, BLOCK_D)
    transposed = tl.permute(weights, (0, 2, 1))
    grad = tl.sum(weights, axis=1)[:, :, None] * cols - tl.dot(transposed, rows, input_precision="ieee")
    store_samples(grad_ptr, col_ids, grad, col_ids < num_samples, NUM_CODEBOOKS, DIM, BLOCK_K, BLOCK_D, True)


# ---------------------------------------------------------------------------------------------------------------------
# Host side: the op contract (one rule each, as csrc/mmd/mmd_args.h) and launch helpers
# ---------------------------------------------------------------------------------------------------------------------


def make_plan(coefs: Sequence[float], chain_src: Sequence[int], chain_step: Sequence[int], chain_base: float) -> Plan:
    """The bandwidth plan arguments as kernel constants: 1..8 positive coefs; chain_src[j] is -2 (own exp), -1 (the
    base) or an earlier bandwidth; every chain_step[j] in [1, MAX_CHAIN_POWER]; chain_base > 0 when the base is used."""
    count = len(coefs)
    if not 1 <= count <= MAX_BANDWIDTHS or len(chain_src) != count or len(chain_step) != count:
        raise ValueError(
            f"the bandwidth plan needs 1 to {MAX_BANDWIDTHS} coefs with one chain_src and chain_step each, got "
            f"{count}, {len(chain_src)} and {len(chain_step)}"
        )
    for j, (coef, src, step) in enumerate(zip(coefs, chain_src, chain_step)):
        if not coef > 0.0:
            raise ValueError(f"coefs must be positive, got coefs[{j}] = {coef}")
        if not (src in (DIRECT_EXP.value, FROM_BASE.value) or 0 <= src < j):
            raise ValueError(f"chain_src[{j}] must be -2, -1 or an earlier bandwidth's index, got {src}")
        if not 1 <= step <= MAX_CHAIN_POWER:
            raise ValueError(f"chain_step[{j}] must be in [1, {MAX_CHAIN_POWER}], got {step}")
        if src == FROM_BASE.value and not chain_base > 0.0:
            raise ValueError(f"chain_base must be positive when chain_src[{j}] = -1, got {chain_base}")
    return Plan(
        tuple(float(c) for c in coefs),
        tuple(int(s) for s in chain_src),
        tuple(int(s) for s in chain_step),
        float(chain_base),
    )


def check_samples(z: torch.Tensor) -> None:
    """z: float32 [N, K, D], contiguous, N >= 2, 1 <= K <= MAX_CODEBOOKS, D >= 1, within the kernels' int32 offsets."""
    if z.dtype != torch.float32 or z.dim() != 3 or not z.is_contiguous():
        raise ValueError(f"z must be a contiguous float32 [N, K, D] tensor, got {z.dtype} {tuple(z.shape)}")
    num_samples, num_codebooks, dim = z.shape
    if num_samples < 2 or not 1 <= num_codebooks <= MAX_CODEBOOKS or dim < 1:
        raise ValueError(
            f"z must hold N >= 2 samples of 1 to {MAX_CODEBOOKS} codebooks and D >= 1 features, got {tuple(z.shape)}"
        )
    if z.numel() >= 2**31:
        raise ValueError("z is too large for the kernels' int32 offsets")


def check_groups(groups: torch.Tensor, z: torch.Tensor) -> None:
    """groups: int32 [G >= 1, K] 0/1 on z's device (the values are not read on the host: no synchronisation)."""
    if groups.device != z.device or groups.dtype != torch.int32:
        raise ValueError(f"groups must be int32 on {z.device}, got {groups.dtype} on {groups.device}")
    if groups.dim() != 2 or groups.shape[0] < 1 or groups.shape[1] != z.shape[1]:
        raise ValueError(f"groups must have shape [G >= 1, K = {z.shape[1]}], got {tuple(groups.shape)}")


def check_perms(perms: torch.Tensor, z: torch.Tensor) -> None:
    """perms: int64 [K, N] on z's device."""
    if perms.device != z.device or perms.dtype != torch.int64 or tuple(perms.shape) != (z.shape[1], z.shape[0]):
        raise ValueError(
            f"perms must be int64 [K, N] = [{z.shape[1]}, {z.shape[0]}] on {z.device}, got {perms.dtype} "
            f"{tuple(perms.shape)} on {perms.device}"
        )


def check_row_range(num_samples: int, row_begin: int, row_end: int) -> tuple[int, int]:
    """(row_begin, row_end) with row_end = -1 meaning N; 0 <= row_begin <= row_end <= N."""
    row_begin, row_end = int(row_begin), int(row_end)
    if row_end < 0:
        row_end = num_samples
    if not 0 <= row_begin <= row_end <= num_samples:
        raise ValueError(
            f"row range must satisfy 0 <= row_begin <= row_end <= N = {num_samples}, got [{row_begin}, {row_end})"
        )
    return row_begin, row_end


def plan_kwargs(plan: Plan) -> dict:
    return {"COEFS": plan.coefs, "SRC": plan.src, "STEP": plan.step, "BASE_COEF": plan.base_coef}


def shape_kwargs(z: torch.Tensor) -> dict:
    return {
        "NUM_CODEBOOKS": z.shape[1],
        "DIM": z.shape[2],
        "BLOCK_N": BLOCK_N,
        "BLOCK_M": BLOCK_M,
        "BLOCK_K": triton.next_power_of_2(z.shape[1]),
        "CHUNK_D": CHUNK_D,
    }


def grad_block_d(z: torch.Tensor) -> int:
    """Width of the gradient accumulator tile: all D features, padded to a power of two (at least tl.dot's 16)."""
    return max(CHUNK_D, triton.next_power_of_2(z.shape[2]))


def num_row_blocks(row_begin: int, row_end: int) -> int:
    """Programs of a launch over the rows [row_begin, row_end): the blocks of the global BLOCK_N-row grid they touch
    (program i is block row_begin // BLOCK_N + i), so that the block pairs of a symmetric plane do not depend on the
    range."""
    return 0 if row_end == row_begin else triton.cdiv(row_end, BLOCK_N) - row_begin // BLOCK_N


def mirrored_tiles() -> bool:
    """Symmetric planes once per block pair, column sides by atomics (the default), or, under
    torch.use_deterministic_algorithms(True), every tile (reproducible bit for bit; see the module docstring)."""
    return not torch.are_deterministic_algorithms_enabled()


def nan_filled(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.full(tuple(shape), float("nan"), dtype=torch.float32, device=like.device)


def grad_buffer(z: torch.Tensor, full_range: bool, atomic: bool) -> torch.Tensor:
    """Every row of the gradient is written when the range is all rows (NaN-filled catches a missed one), else the
    rows outside the range must hold 0, as must every row when the kernels add to it by atomics."""
    return nan_filled(z.shape, z) if full_range and not atomic else torch.zeros_like(z)
