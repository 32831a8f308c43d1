"""RVQ on the GPU backends (CUDA kernel, compiled Triton) against the reference; only where a CUDA device exists."""

import pytest
import torch
from test_rvq import integer_problem
from tolerances import assert_codes_near_optimal

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
    assert torch.equal(mmdkernels.rvq_decode(codes, books, backend=backend), quantized.sum(1))  # integers: exact


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_random_data_agrees_with_cpu_kernel(backend):
    g = torch.Generator().manual_seed(3)
    x, books = torch.randn(2, 64, 5000, generator=g), torch.randn(4, 1024, 64, generator=g)
    rows = x.transpose(1, 2).reshape(-1, 64)
    for codes, name in (
        (mmdkernels.rvq_encode(x, books, backend="cpp"), "cpp"),
        (mmdkernels.rvq_encode(x.cuda(), books.cuda(), backend=backend).cpu(), backend),
    ):  # float32 near-ties may break either way: each kernel's codes by the rule, not equal to each other
        assert_codes_near_optimal(rows, books, codes.transpose(1, 2).reshape(-1, 4), name=f"{name} codes")
