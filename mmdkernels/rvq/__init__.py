"""Fused residual vector quantization: all K nearest-neighbour stages in one kernel, and the decode gather-sum."""

from __future__ import annotations

import torch

from mmdkernels._dispatch import checking_values, choose_backend
from mmdkernels.rvq import ops
from mmdkernels.rvq.reference import codebook_sqnorms, rvq_decode_ref, rvq_encode_ref, rvq_encode_rows_ref

__all__ = ["rvq_encode", "rvq_decode", "rvq_encode_ref", "rvq_decode_ref"]


def _check_codebooks(codebooks) -> None:
    if not isinstance(codebooks, torch.Tensor):
        raise TypeError(f"codebooks must be a torch.Tensor of shape [K, C, D], got {type(codebooks).__name__}")
    if not codebooks.is_floating_point():
        raise TypeError(f"codebooks must be a floating tensor [K, C, D], got {codebooks.dtype}")
    if codebooks.dim() != 3 or min(codebooks.shape) < 1:
        raise ValueError(f"codebooks must have shape [K, C, D] with K, C, D >= 1, got shape {tuple(codebooks.shape)}")
    if checking_values() and not bool(torch.isfinite(codebooks).all()):
        raise ValueError("codebooks contains NaN or Inf")


def rvq_encode(
    x: torch.Tensor, codebooks: torch.Tensor, *, return_quantized: bool = False, backend: str | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Residual VQ encode through all K stages: nearest entry (squared L2, ties to the lowest index), subtract, next.

    Args:
        x: [B, D, T] latent frames (float32/bfloat16/float16; computed in float32).
        codebooks: [K, C, D] codebook entries, same device.
        return_quantized: also return the entry chosen at every stage, the per-codebook outputs the MMD loss takes.
        backend: "cpp", "cuda", "triton" or "reference"; None picks the fastest available.
    Returns:
        codes int64 [B, K, T]; with return_quantized also quantized [B, K, D, T] (float32).

    Example:
        >>> codes, q = mmdkernels.rvq_encode(latents, codebooks, return_quantized=True)
        >>> loss = mmdkernels.mmd_loss(q, delay=True)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [B, D, T], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor [B, D, T], got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [B, D, T] (3 dims), got shape {tuple(x.shape)}")
    if x.shape[0] * x.shape[2] == 0:
        raise ValueError(f"x is an empty batch: shape {tuple(x.shape)} has no frames to encode")
    _check_codebooks(codebooks)
    if codebooks.shape[2] != x.shape[1]:
        raise ValueError(f"codebooks must have D = {x.shape[1]} (x's dim 1), got shape {tuple(codebooks.shape)}")
    if codebooks.device != x.device:
        raise ValueError(f"codebooks is on {codebooks.device} but x is on {x.device}: they must match")
    if checking_values() and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf")
    backend = choose_backend(x, backend, "rvq_encode")
    batch, dim, frames = x.shape
    rows = x.detach().transpose(1, 2).reshape(batch * frames, dim).float().contiguous()
    books = codebooks.detach().float().contiguous()
    sqnorms = codebook_sqnorms(books).contiguous()
    if backend == "reference":
        codes, quantized = rvq_encode_rows_ref(rows, books, sqnorms)
    else:
        codes, quantized = ops.encode_op(backend)(rows, books, sqnorms, return_quantized)
    codes = codes.view(batch, frames, -1).transpose(1, 2)
    if not return_quantized:
        return codes
    return codes, quantized.view(batch, frames, -1, dim).permute(0, 2, 3, 1)


def rvq_decode(codes: torch.Tensor, codebooks: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Sum of the chosen entries over the K stages (in order), a fused gather-sum.

    Args:
        codes: int [B, K, T] with values in [0, C).
        codebooks: [K, C, D].
    Returns:
        [B, D, T] float32.
    """
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor [B, K, T], got {getattr(codes, 'dtype', type(codes))}")
    if codes.dim() != 3:
        raise ValueError(f"codes must have shape [B, K, T] (3 dims), got shape {tuple(codes.shape)}")
    _check_codebooks(codebooks)
    if codes.shape[1] != codebooks.shape[0]:
        raise ValueError(f"codes must have K = {codebooks.shape[0]} (codebooks' dim 0), got shape {tuple(codes.shape)}")
    if checking_values() and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codebooks.shape[1]):
        raise ValueError(
            f"codes must be in [0, {codebooks.shape[1]}), got values in [{int(codes.min())}, {int(codes.max())}]"
        )
    backend = choose_backend(codebooks, backend, "rvq_decode")
    batch, num_codebooks, frames = codes.shape
    books = codebooks.detach().float().contiguous()
    if backend == "reference":
        return rvq_decode_ref(codes.long(), books)
    rows = codes.long().transpose(1, 2).reshape(batch * frames, num_codebooks).contiguous()
    out = ops.decode_op(backend)(rows, books)
    return out.view(batch, frames, -1).transpose(1, 2)
