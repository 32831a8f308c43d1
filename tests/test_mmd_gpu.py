"""The GPU backends (CUDA kernel, compiled Triton) against the float64 reference on the same device and permutations.

Runs only where a CUDA device is present (the project's GPU check script: benchmarks/gpu_check.sh)."""

import math

import pytest
import torch

import mmdkernels
from mmdkernels.mmd import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

BACKENDS = ["cuda", "triton"]
SHAPES = [(1, 1, 1, 2), (2, 2, 3, 5), (3, 4, 17, 11), (4, 4, 32, 129), (2, 8, 16, 261), (8, 4, 128, 100)]
OPTIONS = [
    dict(mode="joint", estimator="shuffle"),
    dict(mode="pairwise", estimator="shuffle"),
    dict(mode="joint", estimator="dhsic"),
    dict(mode="pairwise", estimator="dhsic"),
    dict(mode="joint", estimator="shuffle", normalization="reference"),
]
RULE_FACTOR = 2.0
LOSS_FLOOR = 2e-6
LOSS_RTOL = 1e-6
GRAD_FLOOR = 3e-4  # __expf (~2 ulp) raised to the chain's powers (up to 1000): ~2e-4 relative at d ~ 0


def _run(x, backend, dtype=None, **kwargs):
    leaf = x.detach().to(dtype or x.dtype).requires_grad_()
    generator = torch.Generator(device=x.device).manual_seed(7)
    if backend == "reference":
        loss = ref.mmd_loss_ref(leaf, generator=generator, **kwargs)
    else:
        loss = mmdkernels.mmd_loss(leaf, generator=generator, backend=backend, **kwargs)
    loss.backward()
    return loss.detach().double(), leaf.grad.double()


def _make(shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = 0.7 * torch.randn(shape, generator=g) + torch.randn(shape[0], 1, shape[2], shape[3], generator=g)
    if shape[3] > 2:
        x[..., 1] = x[..., 0]
    return x.to(dtype).cuda()


def _valid(shape, options):
    if options["mode"] == "pairwise" and shape[1] < 2:
        return False
    return not (options.get("normalization") == "reference" and shape[0] < 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o.values()))
def test_gpu_backend_matches_reference(backend, shape, options):
    if not _valid(shape, options):
        pytest.skip(f"{shape} is not a valid input for {options}")
    x = _make(shape)
    loss64, grad64 = _run(x, "reference", torch.float64, **options)
    loss32, grad32 = _run(x, "reference", torch.float32, **options)
    loss, grad = _run(x, backend, **options)
    num_terms = 6 * (math.comb(shape[1], 2) if options["mode"] == "pairwise" else 1)
    loss_tol = RULE_FACTOR * (loss32 - loss64).abs() + LOSS_FLOOR * num_terms + LOSS_RTOL * loss64.abs()
    assert (loss - loss64).abs() <= loss_tol, f"{backend}: loss {loss.item()} vs {loss64.item()}"
    scale = grad64.abs().max().clamp_min(1e-30)
    grad_tol = RULE_FACTOR * (grad32 - grad64).abs().max() / scale + GRAD_FLOOR
    assert (grad - grad64).abs().max() / scale <= grad_tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_inputs(backend, dtype):
    x = _make((4, 4, 32, 60), dtype)
    loss, grad = _run(x, backend)
    loss64, grad64 = _run(x, "reference", torch.float64)
    assert (loss - loss64).abs() <= 1e-4
    assert (grad - grad64).abs().max() / grad64.abs().max() < 1e-2


def test_gpu_default_dispatch_is_cuda_kernel_and_matches_cpu_kernel():
    """dHSIC has no randomness: the CUDA kernel and the C++ CPU kernel must agree on the same input."""
    x = _make((4, 4, 32, 60))
    gpu = mmdkernels.mmd_loss(x, estimator="dhsic")
    cpu = mmdkernels.mmd_loss(x.cpu(), estimator="dhsic", backend="cpp")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-6)


def test_gpu_generator_must_match_device():
    with pytest.raises(ValueError, match="generator is on cpu but x is on cuda"):
        mmdkernels.mmd_loss(_make((2, 2, 4, 10)), generator=torch.Generator())
