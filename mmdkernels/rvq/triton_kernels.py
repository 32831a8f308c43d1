# Triton backend of the fused RVQ encode/decode (contract: docs/rvq_kernels.md). Encode fuses all K stages in one
# launch: each program owns BLOCK_N rows whose residual [BLOCK_N, BLOCK_D] (D zero-padded to a power of two) stays in
# registers; per stage it streams BLOCK_C codebook entries at a time, scores them with a tl.dot tile, reduces the
# tile at once into a running (best score, best index) per row, then gathers the chosen entries and subtracts them.
# No [N, C] score matrix exists. Decode is a gather-sum over the stages in order. Everything is float32, accumulated in
# float32 (tl.dot with input_precision="ieee").

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32  # rows per program
MAX_BLOCK_C = 64  # codebook entries per score tile, fewer for wide rows (_entry_block)
MIN_BLOCK = 16  # tl.dot's smallest tile edge: rows, entries and features are padded to at least this
MAX_ENTRY_TILE = 4096  # floats in one [BLOCK_C, BLOCK_D] tile of entries, to bound registers per thread
# Offline ptxas for sm_90 shows no register spills with 8 warps up to D = 256 (a few bytes at D = 64 and 512); with 4,
# D = 64 spills ~300 bytes. Not timed on a GPU.
NUM_WARPS = 8


# ---------------------------------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, row_ids, row_mask, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `row_ids` of a [rows, DIM] matrix as a tile [len(row_ids), BLOCK_D], zero where masked or padded."""
    features = tl.arange(0, BLOCK_D)[None, :]
    mask = row_mask[:, None] & (features < DIM)
    return tl.load(ptr + row_ids[:, None] * DIM + features, mask=mask, other=0.0)


@triton.jit
def _nearest_entries(
    residual,
    codebook_ptr,
    sqnorms_ptr,
    num_entries,
    DIM: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per row of residual [BLOCK_N, BLOCK_D], the index (int32) of the codebook entry [num_entries, DIM] with the
    smallest score sqnorm - 2 r.c; ties go to the lowest index."""
    best_scores = tl.full([residual.shape[0]], float("inf"), tl.float32)
    best_ids = tl.zeros([residual.shape[0]], tl.int32)
    for start in range(0, num_entries, BLOCK_C):
        entry_ids = start + tl.arange(0, BLOCK_C)
        entry_mask = entry_ids < num_entries
        entries = _load_rows(codebook_ptr, entry_ids, entry_mask, DIM, BLOCK_D)
        # padded entries score +inf (their dot is 0), so they never beat a real entry
        sqnorms = tl.load(sqnorms_ptr + entry_ids, mask=entry_mask, other=float("inf"))
        dots = tl.dot(residual, tl.trans(entries), input_precision="ieee")
        scores = sqnorms[None, :] - 2.0 * dots
        tile_best = tl.min(scores, axis=1)
        tile_ids = tl.min(tl.where(scores == tile_best[:, None], entry_ids[None, :], num_entries), axis=1)
        # strict: on an equal score the earlier tile, hence the lower index, wins
        improved = tile_best < best_scores
        best_scores = tl.where(improved, tile_best, best_scores)
        best_ids = tl.where(improved, tile_ids, best_ids)
    return best_ids


@triton.jit
def _rvq_encode_kernel(
    x_ptr,
    codebooks_ptr,
    sqnorms_ptr,
    codes_ptr,
    quantized_ptr,
    num_rows,
    num_stages,
    num_entries,
    DIM: tl.constexpr,
    RETURN_QUANTIZED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """All K stages for one block of rows: codes_ptr [N, K] int64, quantized_ptr [N, K, DIM] (if RETURN_QUANTIZED)."""
    row_ids = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row_ids < num_rows
    residual = _load_rows(x_ptr, row_ids, row_mask, DIM, BLOCK_D)
    for stage in range(num_stages):
        codebook_ptr = codebooks_ptr + stage * num_entries * DIM
        codes = _nearest_entries(
            residual, codebook_ptr, sqnorms_ptr + stage * num_entries, num_entries, DIM, BLOCK_C, BLOCK_D
        )
        chosen = _load_rows(codebook_ptr, codes, row_mask, DIM, BLOCK_D)
        residual -= chosen
        out_rows = row_ids * num_stages + stage
        tl.store(codes_ptr + out_rows, codes.to(tl.int64), mask=row_mask)
        if RETURN_QUANTIZED:
            features = tl.arange(0, BLOCK_D)[None, :]
            mask = row_mask[:, None] & (features < DIM)
            tl.store(quantized_ptr + out_rows[:, None] * DIM + features, chosen, mask=mask)


@triton.jit
def _rvq_decode_kernel(
    codes_ptr,
    codebooks_ptr,
    out_ptr,
    num_rows,
    num_stages,
    num_entries,
    DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out [N, DIM] = sum over stages k = 0, 1, ... of codebooks[k, codes[n, k]] for one block of rows."""
    row_ids = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row_ids < num_rows
    total = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for stage in range(num_stages):
        codes = tl.load(codes_ptr + row_ids * num_stages + stage, mask=row_mask, other=0)
        total += _load_rows(codebooks_ptr + stage * num_entries * DIM, codes, row_mask, DIM, BLOCK_D)
    features = tl.arange(0, BLOCK_D)[None, :]
    tl.store(out_ptr + row_ids[:, None] * DIM + features, total, mask=row_mask[:, None] & (features < DIM))


# ---------------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, tensor, dtype: torch.dtype, ndim: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} {layout}, got {tensor.dtype}")
    if tensor.dim() != ndim or not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {layout} tensor, got shape {tuple(tensor.shape)}")
    if tensor.numel() >= 2**31:
        raise ValueError(f"{name} is too large for the kernels' int32 offsets")


def _check_codebooks(codebooks, device: torch.device) -> None:
    _check_tensor("codebooks", codebooks, torch.float32, 3, "[K, C, D]")
    if min(codebooks.shape) < 1:
        raise ValueError(f"codebooks [K, C, D] must have K, C, D >= 1, got {tuple(codebooks.shape)}")
    if codebooks.device != device:
        raise ValueError(f"codebooks are on {codebooks.device}, the other inputs on {device}")


def _check_encode_inputs(x, codebooks, sqnorms) -> None:
    _check_tensor("x", x, torch.float32, 2, "[N, D]")
    _check_codebooks(codebooks, x.device)
    num_stages, num_entries, dim = codebooks.shape
    if x.shape[1] != dim:
        raise ValueError(f"x has D = {x.shape[1]} features, codebooks have D = {dim}")
    _check_tensor("sqnorms", sqnorms, torch.float32, 2, "[K, C]")
    if tuple(sqnorms.shape) != (num_stages, num_entries):
        raise ValueError(f"sqnorms must be [K, C] = [{num_stages}, {num_entries}], got {tuple(sqnorms.shape)}")
    if sqnorms.device != x.device:
        raise ValueError(f"sqnorms is on {sqnorms.device}, x on {x.device}")
    if x.shape[0] * num_stages * dim >= 2**31:
        raise ValueError("quantized [N, K, D] is too large for the kernels' int32 offsets")


def _check_decode_inputs(codes, codebooks) -> None:
    _check_tensor("codes", codes, torch.int64, 2, "[N, K]")
    _check_codebooks(codebooks, codes.device)
    num_stages, num_entries, dim = codebooks.shape
    if codes.shape[1] != num_stages:
        raise ValueError(f"codes must have K = {num_stages} columns (one per codebook), got {codes.shape[1]}")
    if codes.shape[0] * dim >= 2**31:
        raise ValueError("the decoded [N, D] output is too large for the kernels' int32 offsets")
    # the kernel gathers codebooks[k, codes[n, k]] unchecked: an out-of-range code would read out of bounds
    if codes.numel() and (codes.min().item() < 0 or codes.max().item() >= num_entries):
        raise ValueError(f"codes must lie in [0, C) = [0, {num_entries})")


def _feature_block(dim: int) -> int:
    """Width of a row tile: D padded to a power of two, at least tl.dot's 16."""
    return max(MIN_BLOCK, triton.next_power_of_2(dim))


def _entry_block(block_d: int) -> int:
    """Entries per score tile: MAX_BLOCK_C, fewer for wide rows so a tile of entries stays <= MAX_ENTRY_TILE floats."""
    return max(MIN_BLOCK, min(MAX_BLOCK_C, MAX_ENTRY_TILE // block_d))


def rvq_encode_triton(
    x: torch.Tensor, codebooks: torch.Tensor, sqnorms: torch.Tensor, return_quantized: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused greedy residual quantization of rows, all stages in one launch (spec: reference.rvq_encode_rows_ref).

    Args:
        x: float32 [N, D], contiguous (CUDA, or CPU under TRITON_INTERPRET=1).
        codebooks: float32 [K, C, D], contiguous, on x's device.
        sqnorms: float32 [K, C], contiguous: |c|^2 of every entry (reference.codebook_sqnorms).
        return_quantized: also return the entry chosen at every stage.
    Returns:
        (codes int64 [N, K], quantized float32 [N, K, D] or an empty [0] tensor when return_quantized is False).
        Stage k picks argmin_c sqnorms[k, c] - 2 r_k . codebooks[k, c], ties to the lowest index.
    """
    _check_encode_inputs(x, codebooks, sqnorms)
    num_rows, dim = x.shape
    num_stages, num_entries, _ = codebooks.shape
    codes = torch.full((num_rows, num_stages), -1, dtype=torch.int64, device=x.device)
    if return_quantized:
        quantized = torch.full((num_rows, num_stages, dim), float("nan"), dtype=torch.float32, device=x.device)
    else:
        quantized = x.new_empty(0)
    if num_rows == 0:
        return codes, quantized
    block_d = _feature_block(dim)
    _rvq_encode_kernel[(triton.cdiv(num_rows, BLOCK_N),)](
        x,
        codebooks,
        sqnorms,
        codes,
        quantized if return_quantized else codes,  # never written then; any valid pointer
        num_rows,
        num_stages,
        num_entries,
        DIM=dim,
        RETURN_QUANTIZED=return_quantized,
        BLOCK_N=BLOCK_N,
        BLOCK_C=_entry_block(block_d),
        BLOCK_D=block_d,
        num_warps=NUM_WARPS,
    )
    return codes, quantized


def rvq_decode_triton(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Fused gather-sum of the chosen entries (spec: reference.rvq_decode_ref, on rows).

    Args:
        codes: int64 [N, K], contiguous, every code in [0, C) (CUDA, or CPU under TRITON_INTERPRET=1).
        codebooks: float32 [K, C, D], contiguous, on codes' device.
    Returns:
        float32 [N, D]: out[n] = sum over k = 0, 1, ..., K-1 of codebooks[k, codes[n, k]], summed in that order.
    """
    _check_decode_inputs(codes, codebooks)
    num_rows = codes.shape[0]
    num_stages, num_entries, dim = codebooks.shape
    out = torch.full((num_rows, dim), float("nan"), dtype=torch.float32, device=codes.device)
    if num_rows == 0:
        return out
    _rvq_decode_kernel[(triton.cdiv(num_rows, BLOCK_N),)](
        codes,
        codebooks,
        out,
        num_rows,
        num_stages,
        num_entries,
        DIM=dim,
        BLOCK_N=BLOCK_N,
        BLOCK_D=_feature_block(dim),
        num_warps=NUM_WARPS,
    )
    return out
