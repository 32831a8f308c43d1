"""Triton fused sampler: one program per (b, k) row, the vocabulary in BLOCK-wide tiles re-read on every pass (a row
is a few KiB, so the passes hit L1/L2). No sort: the top-k and top-p boundaries are found by a bitwise descent on
the 64-bit rank key (order key of z, then V - 1 - index), each step one pass that sums a count (top-k) or the float64
mass exp(z - max) (top-p) of the tokens ranked at or above a candidate key. The draw is a tiled float64 cumsum in
vocabulary order. CFG and temperature are computed in float32 like the spec (mmdkernels/sampling/reference.py).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

BLOCK = 1024
_RADIX_BITS = 2  # bits of the rank key fixed per descent pass (RADIX candidates summed at once)
RADIX = tl.constexpr(1 << _RADIX_BITS)
ORDER_KEY_PASSES = tl.constexpr(32 // _RADIX_BITS)  # the 32-bit order key of z
FIRST_KEY_STEP = tl.constexpr(1 << (32 - _RADIX_BITS))


@triton.jit
def _scaled_logits(
    row_ptr, uncond_offset, offs, mask, inv_temperature, cfg_coef, USE_CFG: tl.constexpr, GREEDY: tl.constexpr
):
    """z of one tile (x itself when GREEDY); -inf past the row end, NaN where a logit is NaN/+inf."""
    cond = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if USE_CFG:
        uncond = tl.load(row_ptr + uncond_offset + offs, mask=mask, other=0.0).to(tl.float32)
        banned = (cond == -float("inf")) | (uncond == -float("inf"))
        bad = (cond != cond) | (uncond != uncond) | (cond == float("inf")) | (uncond == float("inf"))
        finite = ~(banned | bad)  # the mix only sees finite values (no inf - inf)
        cond = tl.where(finite, cond, 0.0)
        uncond = tl.where(finite, uncond, 0.0)
        x = uncond + cfg_coef * (cond - uncond)
        x = tl.where(bad, float("nan"), tl.where(banned, -float("inf"), x))
    else:
        x = cond
    x = tl.where(mask, x, -float("inf"))
    if not GREEDY:
        x = x * inv_temperature
        x = tl.where(x == 0.0, 0.0, x)  # -0 -> +0: equal floats get equal order keys
    return x


@triton.jit
def _order_key(z):
    """Monotone float32 -> [0, 2^32) map, as int64 (csrc/sampling/sampling_tile.h, order_key)."""
    bits = z.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)


@triton.jit
def _ranked_at_or_above(key, low, key_bound, low_bound):
    """(key, low) >= (key_bound, low_bound) lexicographically: ranked at or before the bound token."""
    return (key > key_bound) | ((key == key_bound) & (low >= low_bound))


@triton.jit
def _mass_from(
    row_ptr,
    uncond_offset,
    num_tokens,
    inv_temperature,
    cfg_coef,
    top,
    key_at,
    low_at,
    key_kept,
    low_kept,
    USE_CFG: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """float64 sum over kept tokens (at or above (key_kept, low_kept)) ranked at or above (key_at, low_at) of
    exp(z - top) (WEIGHTED) or 1."""
    total = tl.sum(tl.zeros([BLOCK], tl.float64), 0)
    for start in range(0, num_tokens, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_tokens
        z = _scaled_logits(row_ptr, uncond_offset, offs, mask, inv_temperature, cfg_coef, USE_CFG, False)
        key = _order_key(z)
        low = num_tokens - 1 - offs
        take = mask & _ranked_at_or_above(key, low, key_at, low_at) & _ranked_at_or_above(key, low, key_kept, low_kept)
        if WEIGHTED:
            weight = tl.exp(z - top).to(tl.float64)
        else:
            weight = tl.full([BLOCK], 1.0, tl.float64)
        total += tl.sum(tl.where(take, weight, 0.0), 0)
    return total


@triton.jit
def _masses_from(
    row_ptr,
    uncond_offset,
    num_tokens,
    inv_temperature,
    cfg_coef,
    top,
    key_at,
    low_at,
    key_step,
    low_step,
    key_kept,
    low_kept,
    USE_CFG: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """_mass_from at the RADIX candidate keys (key_at + d key_step, low_at + d low_step), d = 0..RADIX-1, in one
    pass: float64 [RADIX]."""
    digit = tl.arange(0, RADIX).to(tl.int64)
    key_candidate = (key_at + digit * key_step)[:, None]
    low_candidate = (low_at + digit * low_step)[:, None]
    total = tl.zeros([RADIX], tl.float64)
    for start in range(0, num_tokens, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_tokens
        z = _scaled_logits(row_ptr, uncond_offset, offs, mask, inv_temperature, cfg_coef, USE_CFG, False)
        key = _order_key(z)
        low = num_tokens - 1 - offs
        kept = mask & _ranked_at_or_above(key, low, key_kept, low_kept)
        if WEIGHTED:
            weight = tl.where(kept, tl.exp(z - top).to(tl.float64), 0.0)
        else:
            weight = tl.where(kept, 1.0, 0.0).to(tl.float64)
        take = _ranked_at_or_above(key[None, :], low[None, :], key_candidate, low_candidate)
        total += tl.sum(tl.where(take, weight[None, :], 0.0), 1)
    return total


@triton.jit
def _boundary(
    row_ptr,
    uncond_offset,
    num_tokens,
    index_digits,
    first_low_step,
    inv_temperature,
    cfg_coef,
    top,
    key_kept,
    low_kept,
    target,
    USE_CFG: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The largest rank key (key, low) whose mass-from is >= target, _RADIX_BITS bits per pass: the order key,
    then the index part (digits of V - 1 - index). That key is a token's, the last one kept (the k-th for counts;
    for masses, the last rank whose mass before is < target). Masses fall as the candidate grows, so the digit is
    the number of candidates that still reach the target, minus one (candidate 0, the prefix, always does)."""
    key = tl.sum(tl.zeros([1], tl.int64), 0)
    step = key + FIRST_KEY_STEP
    for _ in range(ORDER_KEY_PASSES):
        masses = _masses_from(
            row_ptr,
            uncond_offset,
            num_tokens,
            inv_temperature,
            cfg_coef,
            top,
            key,
            0,
            step,
            0,
            key_kept,
            low_kept,
            USE_CFG,
            WEIGHTED,
            BLOCK,
        )
        key += (tl.sum((masses >= target).to(tl.int64), 0) - 1) * step
        step = step // RADIX
    low = key * 0
    step = key * 0 + first_low_step
    for _ in range(index_digits):
        masses = _masses_from(
            row_ptr,
            uncond_offset,
            num_tokens,
            inv_temperature,
            cfg_coef,
            top,
            key,
            low,
            0,
            step,
            key_kept,
            low_kept,
            USE_CFG,
            WEIGHTED,
            BLOCK,
        )
        low += (tl.sum((masses >= target).to(tl.int64), 0) - 1) * step
        step = step // RADIX
    return key, low


@triton.jit
def _sample_kernel(
    logits_ptr,
    uniforms_ptr,
    tokens_ptr,
    num_tokens,
    uncond_offset,
    index_digits,
    first_low_step,
    inv_temperature,
    cfg_coef,
    top_k,
    top_p_bits,
    USE_CFG: tl.constexpr,
    GREEDY: tl.constexpr,
    USE_TOP_K: tl.constexpr,
    USE_TOP_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * num_tokens
    # Pass 1: the maximum, whether the row is valid.
    top = tl.max(tl.full([BLOCK], -float("inf"), tl.float32), 0)
    bad = tl.max(tl.zeros([BLOCK], tl.int32), 0)
    for start in range(0, num_tokens, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_tokens
        z = _scaled_logits(row_ptr, uncond_offset, offs, mask, inv_temperature, cfg_coef, USE_CFG, GREEDY)
        bad = tl.maximum(bad, tl.max(((z != z) | (z == float("inf"))).to(tl.int32), 0))
        top = tl.maximum(top, tl.max(tl.where(mask, z, -float("inf")), 0))
    invalid = (bad > 0) | (top == -float("inf"))
    top = tl.where(invalid, 0.0, top)
    # Tensors from the start (num_tokens == 1 arrives as a constexpr), so the loops below keep their types.
    first = tl.sum(tl.zeros([BLOCK], tl.int32), 0) + num_tokens
    last = tl.sum(tl.zeros([BLOCK], tl.int32), 0) - 1
    if GREEDY:
        for start in range(0, num_tokens, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < num_tokens
            z = _scaled_logits(row_ptr, uncond_offset, offs, mask, inv_temperature, cfg_coef, USE_CFG, GREEDY)
            first = tl.minimum(first, tl.min(tl.where(mask & (z == top), offs, num_tokens), 0))
    else:
        key_kept = tl.sum(tl.zeros([1], tl.int64), 0)
        low_kept = key_kept
        if USE_TOP_K:
            key_kept, low_kept = _boundary(
                row_ptr,
                uncond_offset,
                num_tokens,
                index_digits,
                first_low_step,
                inv_temperature,
                cfg_coef,
                top,
                key_kept,
                low_kept,
                top_k,  # a float32 count: exact below 2^24
                USE_CFG,
                False,
                BLOCK,
            )
        if USE_TOP_P:
            top_p = top_p_bits.to(tl.float64, bitcast=True)  # the exact float64 top_p
            total = _mass_from(
                row_ptr,
                uncond_offset,
                num_tokens,
                inv_temperature,
                cfg_coef,
                top,
                key_kept,
                low_kept,
                key_kept,
                low_kept,
                USE_CFG,
                True,
                BLOCK,
            )
            key_kept, low_kept = _boundary(
                row_ptr,
                uncond_offset,
                num_tokens,
                index_digits,
                first_low_step,
                inv_temperature,
                cfg_coef,
                top,
                key_kept,
                low_kept,
                top_p * total,
                USE_CFG,
                True,
                BLOCK,
            )
        # The draw: the first kept index whose float64 cumulative mass exceeds u * (kept mass), in vocab order.
        total = _mass_from(
            row_ptr,
            uncond_offset,
            num_tokens,
            inv_temperature,
            cfg_coef,
            top,
            key_kept,
            low_kept,
            key_kept,
            low_kept,
            USE_CFG,
            True,
            BLOCK,
        )
        threshold = tl.load(uniforms_ptr + row) * total
        through = total * 0.0
        for start in range(0, num_tokens, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < num_tokens
            z = _scaled_logits(row_ptr, uncond_offset, offs, mask, inv_temperature, cfg_coef, USE_CFG, False)
            e = tl.exp(z - top)
            kept = mask & _ranked_at_or_above(_order_key(z), num_tokens - 1 - offs, key_kept, low_kept) & (e > 0.0)
            weight = tl.where(kept, e.to(tl.float64), 0.0)
            cumulative = through + tl.cumsum(weight, 0)
            first = tl.minimum(first, tl.min(tl.where(kept & (cumulative > threshold), offs, num_tokens), 0))
            last = tl.maximum(last, tl.max(tl.where(kept, offs, -1), 0))
            through += tl.sum(weight, 0)
    token = tl.where(first < num_tokens, first, last).to(tl.int64)
    tl.store(tokens_ptr + row, tl.where(invalid, -1, token))


def sample_tokens_triton(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    cfg_coef: float,
    use_cfg: bool,
) -> torch.Tensor:
    """Launcher (see mmdkernels::sample_tokens in csrc/bindings.cpp): logits [N, K, V] contiguous, uniforms float64
    [B, K] -> int64 [B, K], -1 for invalid rows."""
    batch, num_codebooks = uniforms.shape
    num_tokens = logits.shape[2]
    tokens = torch.empty((batch, num_codebooks), dtype=torch.int64, device=logits.device)
    greedy = temperature == 0.0
    index_digits = -(-max(1, (num_tokens - 1).bit_length()) // _RADIX_BITS)
    inv_temperature = float(torch.tensor(1.0 / temperature, dtype=torch.float32)) if not greedy else 1.0
    _sample_kernel[(batch * num_codebooks,)](
        logits,
        uniforms,
        tokens,
        num_tokens,
        batch * num_codebooks * num_tokens,
        index_digits,
        1 << (_RADIX_BITS * (index_digits - 1)),
        inv_temperature,
        float(torch.tensor(cfg_coef, dtype=torch.float32)),
        float(top_k),  # a float argument: an int equal to 1 would arrive as a constexpr
        struct.unpack("<q", struct.pack("<d", top_p))[0],
        USE_CFG=use_cfg,
        GREEDY=greedy,
        USE_TOP_K=0 < top_k < num_tokens,
        USE_TOP_P=top_p < 1.0,
        BLOCK=max(16, min(BLOCK, triton.next_power_of_2(num_tokens))),  # >= 16: the smallest tile the GPU likes
    )
    return tokens
