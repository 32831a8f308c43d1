"""Shared MMD test cases: inputs, options, and the comparison with the float64 reference (any device)."""

from __future__ import annotations

import math

import torch

import mmdkernels
from mmdkernels.mmd import reference as ref

# Error allowed against the float64 reference, flash-attention style: at most RULE_FACTOR times the error of the
# same maths done by PyTorch in float32 (the published computation), plus a floor relative to the loss scale.
RULE_FACTOR = 2.0
LOSS_FLOOR = 2e-6  # x (number of bandwidths x groups): the loss is a sum of that many kernel means <= 1
LOSS_RTOL = 1e-6  # the float32 result itself (the published normalisation adds a large constant)
GRAD_FLOOR_CPU = 2e-5  # relative to max |grad|
GRAD_FLOOR_GPU = 3e-4  # __expf (~2 ulp) raised to the chain's powers (up to 1000): ~2e-4 relative at d ~ 0

OPTIONS = [
    dict(mode="joint", estimator="shuffle"),
    dict(mode="pairwise", estimator="shuffle"),
    dict(mode="joint", estimator="dhsic"),
    dict(mode="pairwise", estimator="dhsic"),
    dict(mode="joint", estimator="shuffle", normalization="reference"),
]


def option_id(options: dict) -> str:
    return "-".join(options.values())


def make_input(shape, dtype=torch.float32, duplicates=True, seed=0, device="cpu") -> torch.Tensor:
    """Random codebook outputs with a shared component (so codebooks are dependent) and exact duplicate frames."""
    g = torch.Generator().manual_seed(seed)
    batch, num_codebooks, dim, num_frames = shape
    shared = torch.randn(batch, 1, dim, num_frames, generator=g)
    x = 0.7 * torch.randn(shape, generator=g) + shared
    if duplicates and num_frames > 2:
        x[..., 1] = x[..., 0]  # quantized outputs repeat: exact duplicates must be handled (d = 0)
    return x.to(dtype).to(device)


def valid(shape, options, delay=False) -> bool:
    batch, num_codebooks, _, num_frames = shape
    if options["mode"] == "pairwise" and num_codebooks < 2:
        return False
    if options.get("normalization") == "reference" and batch < 2:
        return False
    frames = num_frames - num_codebooks if delay else num_frames
    return frames >= 1 and batch * frames >= 2


def run(x, backend, dtype=None, seed=7, **kwargs):
    """(loss, grad) as float64, for `backend` (or "reference") on x converted to dtype, seeded on x's device."""
    leaf = x.detach().to(dtype or x.dtype).requires_grad_()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    if backend == "reference":
        loss = ref.mmd_loss_ref(leaf, generator=generator, **kwargs)
    else:
        loss = mmdkernels.mmd_loss(leaf, generator=generator, backend=backend, **kwargs)
    loss.backward()
    return loss.detach().double(), leaf.grad.double()


def assert_close_to_reference(x, backend, grad_floor=GRAD_FLOOR_CPU, **kwargs):
    """Kernel vs float64 reference, with the float32 PyTorch reference's own error as the yardstick."""
    loss64, grad64 = run(x, "reference", torch.float64, **kwargs)
    loss32, grad32 = run(x, "reference", torch.float32, **kwargs)
    loss, grad = run(x, backend, **kwargs)
    pairs = math.comb(x.shape[1], 2) if kwargs.get("mode") == "pairwise" else 1
    num_terms = len(kwargs.get("bandwidths", ref.DEFAULT_BANDWIDTHS)) * pairs
    loss_tol = RULE_FACTOR * (loss32 - loss64).abs() + LOSS_FLOOR * num_terms + LOSS_RTOL * loss64.abs()
    assert (loss - loss64).abs() <= loss_tol, f"{backend}: loss {loss.item()} vs float64 {loss64.item()}"
    scale = grad64.abs().max().clamp_min(1e-30)
    grad_err = (grad - grad64).abs().max() / scale
    grad_tol = RULE_FACTOR * (grad32 - grad64).abs().max() / scale + grad_floor
    assert grad_err <= grad_tol, f"{backend}: gradient error {grad_err.item():.3g} > {grad_tol.item():.3g}"
    assert torch.isfinite(grad).all()
