# Triton backend of KV-cached decode attention (spec: mmdkernels/attention/reference.py), split-K flash-decoding.
# Program (row, split) owns one query head of one sequence and a contiguous range of its valid keys: it streams
# BLOCK_N keys at a time as [BLOCK_N, BLOCK_D] tiles (Dh zero-padded to a power of two), scores them against the
# query held in registers, and folds them into a running max / rescaled sum / unnormalised output accumulator.
# Keys at or past the sequence's length are masked out of every load, so garbage there is never read. With one split
# the program writes the normalised output; with several, a combine kernel merges the partials. float32 throughout.

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per tile
MIN_KEYS_PER_SPLIT = 128  # shorter splits cost more in partial traffic than they gain in parallelism
PROGRAMS_PER_SM = 4  # split until the grid has this many programs per streaming multiprocessor
INTERPRETER_SMS = 4  # stand-in SM count for the CPU interpreter (keeps the split path exercised by the tests)


# ---------------------------------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _to_output_dtype(x, dtype: tl.constexpr):
    """float32 -> dtype, rounding to nearest even. For bfloat16 the rounding is done by hand: the CPU interpreter's
    cast truncates, and on a GPU the cast of the already rounded value is exact, so both give the same bits."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _decode_attention_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lengths_ptr,
    out_ptr,
    partial_acc_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    scale,
    heads,
    group,
    max_len,
    num_splits,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    row = tl.program_id(0)  # b * heads + h
    split = tl.program_id(1)
    b = row // heads
    h = row % heads
    g = h // group
    length = tl.minimum(tl.maximum(tl.load(lengths_ptr + b), 0), max_len)
    chunk = tl.cdiv(length, num_splits)
    begin = tl.minimum(split * chunk, length)
    end = tl.minimum(begin + chunk, length)

    features = tl.arange(0, BLOCK_D)
    feature_mask = features < DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + features * stride_qd, mask=feature_mask, other=0.0)
    q = q.to(tl.float32) * scale
    k_head = k_ptr + b * stride_kb + g * stride_kh
    v_head = v_ptr + b * stride_vb + g * stride_vh

    running_max = tl.full([1], float("-inf"), tl.float32)
    running_sum = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(begin, end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        valid = positions < end
        tile_mask = valid[:, None] & feature_mask[None, :]
        keys = tl.load(
            k_head + positions[:, None] * stride_ks + features[None, :] * stride_kd, mask=tile_mask, other=0.0
        )
        scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1)
        scores = tl.where(valid, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))  # finite: every tile has a valid key
        factor = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max)
        values = tl.load(
            v_head + positions[:, None] * stride_vs + features[None, :] * stride_vd, mask=tile_mask, other=0.0
        )
        acc = acc * factor + tl.sum(weights[:, None] * values.to(tl.float32), axis=0)
        running_sum = running_sum * factor + tl.sum(weights, axis=0)
        running_max = new_max

    if SPLIT:
        slot = row * num_splits + split
        tl.store(partial_acc_ptr + slot * BLOCK_D + features, acc)
        tl.store(partial_max_ptr + slot + tl.arange(0, 1), running_max)
        tl.store(partial_sum_ptr + slot + tl.arange(0, 1), running_sum)
    else:
        inverse = tl.where(running_sum > 0, 1.0 / running_sum, 0.0)
        out = acc * inverse
        tl.store(out_ptr + row * DIM + features, _to_output_dtype(out, out_ptr.dtype.element_ty), mask=feature_mask)


@triton.jit
def _decode_attention_combine_kernel(
    partial_acc_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    out_ptr,
    num_splits,
    DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Merges the num_splits partials of one (sequence, head): rescale each to the common max, sum, normalise."""
    row = tl.program_id(0)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < num_splits
    features = tl.arange(0, BLOCK_D)
    maxima = tl.load(partial_max_ptr + row * num_splits + splits, mask=split_mask, other=float("-inf"))
    sums = tl.load(partial_sum_ptr + row * num_splits + splits, mask=split_mask, other=0.0)
    top = tl.max(maxima, axis=0)
    # empty splits (max -inf) get factor 0; an all-empty row (never after validation) would give top = -inf
    factors = tl.where(maxima > float("-inf"), tl.exp(maxima - top), 0.0)
    accs = tl.load(
        partial_acc_ptr + (row * num_splits + splits)[:, None] * BLOCK_D + features[None, :],
        mask=split_mask[:, None],
        other=0.0,
    )
    total = tl.sum(sums * factors, axis=0)
    inverse = tl.where(total > 0, 1.0 / total, 0.0)
    out = tl.sum(accs * factors[:, None], axis=0) * inverse
    tl.store(out_ptr + row * DIM + features, _to_output_dtype(out, out_ptr.dtype.element_ty), mask=features < DIM)


# ---------------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------------


def _num_splits(device: torch.device, rows: int, max_len: int) -> int:
    """Splits per query head: enough programs to fill the GPU, none shorter than MIN_KEYS_PER_SPLIT keys. From the
    cache size, not the lengths (reading those would wait for the GPU)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else INTERPRETER_SMS
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, rows)
    return max(1, min(wanted, triton.cdiv(max_len, MIN_KEYS_PER_SPLIT)))


def decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, H, Dh], caches [B, H_kv, S_max, Dh] (any strides), lengths int64 [B] -> [B, H, Dh] in q's dtype."""
    batch, heads, dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty((batch, heads, dim), device=q.device, dtype=q.dtype)
    block_d = max(16, triton.next_power_of_2(dim))
    rows = batch * heads
    splits = _num_splits(q.device, rows, max_len)
    if splits > 1:
        partial_acc = torch.empty((rows, splits, block_d), device=q.device, dtype=torch.float32)
        partial_max = torch.empty((rows, splits), device=q.device, dtype=torch.float32)
        partial_sum = torch.empty((rows, splits), device=q.device, dtype=torch.float32)
    else:
        partial_acc = partial_max = partial_sum = out  # unused
    _decode_attention_split_kernel[(rows, splits)](
        q,
        k_cache,
        v_cache,
        lengths,
        out,
        partial_acc,
        partial_max,
        partial_sum,
        scale,
        heads,
        heads // kv_heads,
        max_len,
        splits,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        DIM=dim,
        BLOCK_D=block_d,
        BLOCK_N=BLOCK_N,
        SPLIT=splits > 1,
    )
    if splits > 1:
        _decode_attention_combine_kernel[(rows,)](
            partial_acc,
            partial_max,
            partial_sum,
            out,
            splits,
            DIM=dim,
            BLOCK_D=block_d,
            BLOCK_S=max(2, triton.next_power_of_2(splits)),
        )
    return out
