"""Memory-lean sample preparation for the fused path: x [B, K, D, T] -> standardised z [N, K, D] in one float32
buffer, and the exact backward of that map. `FusedLoss` runs preparation, kernel and the whole backward chain in
its forward pass (the loss is a scalar, so its gradient is known there), keeping one [N, K, D] buffer alive
instead of autograd's chain of copies (the memory target: < 64 MiB at N = 8192, K*D = 512)."""

from __future__ import annotations

from typing import Callable

import torch

from mmdkernels.mmd.reference import STANDARDIZE_EPS

_ROWS_PER_CHUNK = 1024


def _frame_window(num_codebooks: int, num_frames: int, k: int, delay: bool) -> slice:
    """The frames of codebook k that form samples (reference.delay_align)."""
    return slice(num_codebooks - k, num_frames - k) if delay else slice(0, num_frames)


def gather_samples(x: torch.Tensor, delay: bool) -> torch.Tensor:
    """x [B, K, D, T] -> float32 [N, K, D], sample n = b*T' + t (same as reference.flatten_samples)."""
    batch, num_codebooks, dim, num_frames = x.shape
    frames = num_frames - num_codebooks if delay else num_frames
    out = torch.empty(batch, frames, num_codebooks, dim, dtype=torch.float32, device=x.device)
    for k in range(num_codebooks):
        out[:, :, k, :].copy_(x[:, k, :, _frame_window(num_codebooks, num_frames, k, delay)].transpose(1, 2))
    return out.view(batch * frames, num_codebooks, dim)


def scatter_samples(grad: torch.Tensor, like: torch.Tensor, delay: bool) -> torch.Tensor:
    """Adjoint of gather_samples: grad [N, K, D] -> [B, K, D, T] in like's dtype (zeros where frames were cropped)."""
    batch, num_codebooks, dim, num_frames = like.shape
    per_frame = grad.view(batch, -1, num_codebooks, dim)
    out = torch.zeros_like(like, memory_format=torch.contiguous_format)
    for k in range(num_codebooks):
        out[:, k, :, _frame_window(num_codebooks, num_frames, k, delay)] = per_frame[:, :, k, :].transpose(1, 2)
    return out


def standardize_(samples: torch.Tensor) -> torch.Tensor:
    """In place: samples <- (samples - mean) / sqrt(unbiased var + eps) over dim 0. Returns the std [1, ...]."""
    std = torch.sqrt(samples.var(dim=0, keepdim=True) + STANDARDIZE_EPS)
    samples.sub_(samples.mean(dim=0, keepdim=True)).div_(std)
    return std


def standardize_backward_(grad: torch.Tensor, z: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """In place: d/ds of z = (s - mean) / std with unbiased var, i.e. (g - mean(g) - z sum(g z) / (N - 1)) / std."""
    num_samples = z.shape[0]
    grad_dot_z = torch.zeros_like(z[:1])
    for start in range(0, num_samples, _ROWS_PER_CHUNK):  # chunked: no [N, K, D] temporary
        grad_dot_z += (grad[start : start + _ROWS_PER_CHUNK] * z[start : start + _ROWS_PER_CHUNK]).sum(0, keepdim=True)
    grad_dot_z /= num_samples - 1
    grad.sub_(grad.mean(dim=0, keepdim=True)).addcmul_(z, grad_dot_z, value=-1.0).div_(std)
    return grad


class FusedLoss(torch.autograd.Function):
    """loss = run_kernel(standardize(gather(x))) with the gradient w.r.t. x computed in the forward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, delay: bool, run_kernel: Callable) -> torch.Tensor:
        compute_grad = ctx.needs_input_grad[0]
        with torch.no_grad():
            z = gather_samples(x, delay)
            std = standardize_(z)
            loss, grad_z = run_kernel(z, compute_grad)
            if compute_grad:
                grad_z = standardize_backward_(grad_z, z, std)
                del z
                ctx.save_for_backward(scatter_samples(grad_z, x, delay))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_x,) = ctx.saved_tensors
        return grad_loss.to(grad_x.dtype) * grad_x, None, None
