# Triton backend of the few-row decode linear with packed weights (spec: decode_linear_ref on a QuantizedLinearWeight):
# y [M, N] = act(scale * (x @ W^T) + bias) for M <= 16 float32 rows x and W [N, D] stored as bfloat16, float16 or int8.
# A memory-bound GEMV: program (column block, split) streams its BLOCK_N weight rows over its range of D in
# [BLOCK_N, BLOCK_K] tiles loaded in the stored dtype and widened to float32 in registers (the point: 2 or 1 bytes read
# per weight). Up to 8 rows multiply into an elementwise accumulator [BLOCK_M, BLOCK_N, BLOCK_K] summed over K once at
# the end (M FMAs per weight, no padding of the rows); 9-16 rows take tl.dot on a [16, BLOCK_K] x tile (float32,
# input_precision="ieee"). x tiles are re-read from L1/L2. When the column blocks alone are too few to keep every SM
# streaming, D is split into ranges whose float32 partials a second kernel sums in split order; the epilogue (int8
# scale once per output, bias, exact-erf GELU) runs on the final sum. Accumulation is float32 throughout.

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_ROWS = 16
DOT_MIN_ROWS = 9  # from here tl.dot's 16-row tile wastes little; below, the elementwise accumulator does M FMAs/weight
BLOCK_K = 128  # weights per row in a tile: one 128-byte line of int8, two of bfloat16 / float16
ACCUMULATOR_ELEMENTS = 4096  # floats of the elementwise accumulator per program: 32 per thread at 4 warps
DOT_BLOCK_N, DOT_BLOCK_K = 32, 64  # the tl.dot path's tile: acc [16, 32], weights [32, 64]
MIN_CHUNKS_PER_SPLIT = 2  # a split's partial sums (M x BLOCK_N floats) stay small next to its weights
PROGRAMS_PER_SM = 8  # split D until the grid has this many programs per streaming multiprocessor
INTERPRETER_SMS = 4  # stand-in SM count for the CPU interpreter (keeps the split path exercised by the tests)
COMBINE_BLOCK_N = 128
NUM_WARPS = 4
# Block sizes are napkin maths, not timed on a GPU (benchmarks/bench_linear_gpu.py will).
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.int8)


# ---------------------------------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _epilogue(
    y, cols, col_mask, scale_ptr, bias_ptr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr
):
    """y [BLOCK_M, BLOCK_N] sums of x . q -> * scale[n] (int8), + bias[n], then the exact GELU (as F.gelu)."""
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
    if GELU:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    return y


@triton.jit
def _linear_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    rows,
    out_features,
    dim,
    chunks_per_split,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    SPLIT: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Columns [pid_n * BLOCK_N, +BLOCK_N) over D's chunks [split * chunks_per_split, +chunks_per_split). SPLIT: writes
    the raw sums to out_ptr [splits, rows, N] (the combine kernel finishes them); else the finished y [rows, N]."""
    split = tl.program_id(1)
    row_ids = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row_ids < rows
    col_mask = cols < out_features
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    k_begin = split * chunks_per_split * BLOCK_K
    for chunk in range(chunks_per_split):
        ks = k_begin + chunk * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = ks < dim
        w = tl.load(
            w_ptr + cols[:, None] * stride_wn + ks[None, :] * stride_wk,
            mask=col_mask[:, None] & k_mask[None, :],
            other=0,
        ).to(tl.float32)
        x = tl.load(
            x_ptr + row_ids[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc=acc, input_precision="ieee")
        else:
            acc += x[:, None, :] * w[None, :, :]
    if USE_DOT:
        y = acc
    else:
        y = tl.sum(acc, axis=2)
    out_mask = row_mask[:, None] & col_mask[None, :]
    offsets = row_ids[:, None] * out_features + cols[None, :]
    if SPLIT:
        tl.store(out_ptr + split * rows * out_features + offsets, y, mask=out_mask)
    else:
        y = _epilogue(y, cols, col_mask, scale_ptr, bias_ptr, HAS_SCALE, HAS_BIAS, GELU)
        tl.store(out_ptr + offsets, y, mask=out_mask)


@triton.jit
def _combine_kernel(
    partial_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    rows,
    out_features,
    num_splits,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out [rows, N] = epilogue(sum over splits s = 0, 1, ... of partial[s]), summed in split order."""
    row_ids = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < out_features
    mask = (row_ids < rows)[:, None] & col_mask[None, :]
    offsets = row_ids[:, None] * out_features + cols[None, :]
    y = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for split in range(num_splits):
        y += tl.load(partial_ptr + split * rows * out_features + offsets, mask=mask, other=0.0)
    y = _epilogue(y, cols, col_mask, scale_ptr, bias_ptr, HAS_SCALE, HAS_BIAS, GELU)
    tl.store(out_ptr + offsets, y, mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------------


def _check_inputs(x, weight, scale, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() != 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a float32 tensor [M, D], got {got}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"x must have at most {MAX_ROWS} rows (a decode step), got {x.shape[0]}")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in WEIGHT_DTYPES:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"weight must have dtype torch.bfloat16, torch.float16 or torch.int8, got {got}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape [N, D = {x.shape[1]}] to match x, got {tuple(weight.shape)}")
    out_features = weight.shape[0]
    if weight.dtype == torch.int8:
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.shape != (out_features,):
            got = f"{scale.dtype} {tuple(scale.shape)}" if isinstance(scale, torch.Tensor) else scale
            raise ValueError(f"scale must be a float32 tensor [N = {out_features}] for int8 weights, got {got}")
    elif scale is not None:
        raise ValueError(f"scale must be None for {weight.dtype} weights (it belongs to int8 weights)")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_features,)):
        got = f"{bias.dtype} {tuple(bias.shape)}"
        raise ValueError(f"bias must be a float32 tensor [N = {out_features}] or None, got {got}")
    for name, tensor in (("weight", weight), ("scale", scale), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {tensor.device}")
    # the kernels' offsets are int32; the partial sums [splits, M, N] hold at most ~N * D / 8 + 16 N floats
    for name, tensor in (("x", x), ("weight", weight)):
        if _last_offset(tensor) >= 2**31:
            raise ValueError(f"{name} {tuple(tensor.shape)} is too large for the kernels' int32 offsets")


def _last_offset(tensor: torch.Tensor) -> int:
    return sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


def _output(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A float32 buffer the kernels fill: NaN under the interpreter, so that the tests catch an unwritten entry; on a
    GPU uninitialised (a fill would be one more launch per layer, as long as a small layer itself)."""
    if device.type == "cpu":
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(device: torch.device, rows: int, out_features: int, dim: int) -> dict:
    """The launch: block sizes, whether tl.dot, and the split of D into (splits, chunks_per_split) chunks of BLOCK_K."""
    use_dot = rows >= DOT_MIN_ROWS
    block_m = MAX_ROWS if use_dot else triton.next_power_of_2(rows)
    block_n, block_k = (DOT_BLOCK_N, DOT_BLOCK_K) if use_dot else (ACCUMULATOR_ELEMENTS // (block_m * BLOCK_K), BLOCK_K)
    column_blocks = triton.cdiv(out_features, block_n)
    chunks = max(1, triton.cdiv(dim, block_k))  # D = 0: one masked chunk, the epilogue on zeros
    wanted = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), column_blocks)
    per_split = max(MIN_CHUNKS_PER_SPLIT, triton.cdiv(chunks, wanted))
    per_split = min(per_split, chunks)
    return dict(
        use_dot=use_dot,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        column_blocks=column_blocks,
        splits=triton.cdiv(chunks, per_split),
        chunks_per_split=per_split,
    )


def small_batch_linear_quantized_triton(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, gelu: bool
) -> torch.Tensor:
    """act(scale * (x @ weight.T) + bias) with the weights widened in registers (spec: decode_linear_ref).

    Args:
        x: float32 [M, D], M <= 16, any strides (CUDA, or CPU under TRITON_INTERPRET=1).
        weight: [N, D] bfloat16, float16 or int8, any strides, on x's device.
        scale: float32 [N] for int8 weights (weight[n] stands for scale[n] * weight[n]), else None.
        bias: float32 [N] or None (scale and bias: any strides, made contiguous here).
        gelu: apply the exact (erf) GELU.
    Returns:
        float32 [M, N], summed in float32.
    """
    _check_inputs(x, weight, scale, bias)
    scale, bias = (None if t is None else t.contiguous() for t in (scale, bias))
    rows, dim = x.shape
    out_features = weight.shape[0]
    out = _output((rows, out_features), x.device)
    if rows == 0 or out_features == 0:
        return out
    p = plan(x.device, rows, out_features, dim)
    split = p["splits"] > 1
    partial = _output((p["splits"], rows, out_features), x.device) if split else out
    flags = dict(HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, GELU=gelu)
    _linear_kernel[(p["column_blocks"], p["splits"])](
        x,
        weight,
        scale if scale is not None else x,  # never read then; any valid pointer
        bias if bias is not None else x,
        partial,
        rows,
        out_features,
        dim,
        p["chunks_per_split"],
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        **flags,
        SPLIT=split,
        USE_DOT=p["use_dot"],
        BLOCK_M=p["block_m"],
        BLOCK_N=p["block_n"],
        BLOCK_K=p["block_k"],
        num_warps=NUM_WARPS,
    )
    if split:
        _combine_kernel[(triton.cdiv(out_features, COMBINE_BLOCK_N),)](
            partial,
            scale if scale is not None else x,
            bias if bias is not None else x,
            out,
            rows,
            out_features,
            p["splits"],
            **flags,
            BLOCK_M=p["block_m"],
            BLOCK_N=COMBINE_BLOCK_N,
            num_warps=NUM_WARPS,
        )
    return out
