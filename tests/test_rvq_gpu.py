"""RVQ on the GPU backends (CUDA kernel, compiled Triton) against the reference; only where a CUDA device exists."""

import pytest
import torch
from test_rvq import integer_problem

import mmdkernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 5, 2, 7), (3, 17, 40, 4, 65), (2, 128, 3000, 4, 2048)])
def test_gpu_codes_identical_on_integer_data(backend, shape):
    x, books = (t.cuda() for t in integer_problem(*shape))
    expected, expected_q = mmdkernels.rvq_encode(x, books, return_quantized=True, backend="reference")
    codes, quantized = mmdkernels.rvq_encode(x, books, return_quantized=True, backend=backend)
    assert torch.equal(codes, expected)
    assert torch.equal(quantized, expected_q)
    torch.testing.assert_close(mmdkernels.rvq_decode(codes, books, backend=backend), quantized.sum(1))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_random_data_agrees_with_cpu_kernel(backend):
    g = torch.Generator().manual_seed(3)
    x, books = torch.randn(2, 64, 5000, generator=g), torch.randn(4, 1024, 64, generator=g)
    cpu = mmdkernels.rvq_encode(x, books, backend="cpp")
    gpu = mmdkernels.rvq_encode(x.cuda(), books.cuda(), backend=backend).cpu()
    assert (cpu == gpu).float().mean() > 0.999  # float32 near-ties may differ in the last bit of a score
