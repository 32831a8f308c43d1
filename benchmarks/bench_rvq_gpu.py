"""GPU RVQ encode: the fused kernels vs the eager matmul + argmin loop, 1M frames (D = 128, C = 2048, K = 4)."""

import pytest
import torch

import mmdkernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
NUM_FRAMES, DIM, NUM_ENTRIES, NUM_CODEBOOKS = 1 << 20, 128, 2048, 4


@pytest.mark.parametrize("provider", ["cuda", "triton", "reference"])
def test_gpu_rvq_encode(benchmark, provider):
    benchmark.group = f"gpu-rvq-encode-N{NUM_FRAMES}"
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, DIM, NUM_FRAMES, device="cuda", generator=g)
    books = torch.randn(NUM_CODEBOOKS, NUM_ENTRIES, DIM, device="cuda", generator=g)

    def encode():
        codes = mmdkernels.rvq_encode(x, books, backend=provider)
        torch.cuda.synchronize()
        return codes

    encode()
    benchmark.pedantic(encode, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(provider=provider, device=torch.cuda.get_device_name())
