"""Plain-PyTorch residual vector quantization (RVQ) encode/decode: the spec the fused kernels are tested against.

Stage k picks, for the residual r_k of every frame, the entry of codebook k that minimises the squared distance
|r_k - c|^2, computed as the score  |c|^2 - 2 r_k . c  (|r_k|^2 is the same for every c), ties to the lowest
index; then r_{k+1} = r_k - c. Every backend evaluates that same score in float32 with the same precomputed |c|^2.
"""

from __future__ import annotations

import torch


def codebook_sqnorms(codebooks: torch.Tensor) -> torch.Tensor:
    """|c|^2 of every entry: codebooks [K, C, D] -> [K, C] (in the codebooks' dtype)."""
    return (codebooks * codebooks).sum(-1)


def rvq_encode_rows_ref(
    x: torch.Tensor, codebooks: torch.Tensor, sqnorms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual quantization of rows. x [N, D], codebooks [K, C, D] -> (codes int64 [N, K],
    quantized [N, K, D]: the entry chosen at each stage). Materialises the [N, C] scores of one stage at a time."""
    if sqnorms is None:
        sqnorms = codebook_sqnorms(codebooks)
    residual = x
    codes, quantized = [], []
    for k in range(codebooks.shape[0]):
        scores = sqnorms[k][None, :] - 2.0 * (residual @ codebooks[k].t())
        code = scores.argmin(dim=1)  # first minimum: ties go to the lowest index
        chosen = codebooks[k][code]
        codes.append(code)
        quantized.append(chosen)
        residual = residual - chosen
    return torch.stack(codes, dim=1), torch.stack(quantized, dim=1)


def rvq_encode_ref(
    x: torch.Tensor, codebooks: torch.Tensor, return_quantized: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [B, D, T], codebooks [K, C, D] -> codes [B, K, T] (and per-stage quantized outputs [B, K, D, T])."""
    batch, dim, frames = x.shape
    rows = x.transpose(1, 2).reshape(batch * frames, dim)
    codes, quantized = rvq_encode_rows_ref(rows, codebooks)
    codes = codes.view(batch, frames, -1).transpose(1, 2)
    if not return_quantized:
        return codes
    return codes, quantized.view(batch, frames, -1, dim).permute(0, 2, 3, 1)


def rvq_decode_ref(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """codes [B, K, T], codebooks [K, C, D] -> sum over k of codebooks[k, codes[:, k]]: [B, D, T] (k in order)."""
    out = codebooks[0][codes[:, 0]]
    for k in range(1, codes.shape[1]):
        out = out + codebooks[k][codes[:, k]]
    return out.transpose(1, 2)
