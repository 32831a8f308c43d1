"""GPU benchmarks of the MMD loss (CUDA kernel, Triton, eager reference), forward + backward, side by side.
Only on a CUDA machine (benchmarks/gpu_check.sh); timed functions end with torch.cuda.synchronize()."""

import pytest
import torch

import mmdkernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

NUM_CODEBOOKS, DIM, BATCH = 4, 128, 8


def _step(x, backend, **kwargs):
    x.grad = None
    generator = torch.Generator(device=x.device).manual_seed(0)
    mmdkernels.mmd_loss(x, generator=generator, backend=backend, **kwargs).backward()
    torch.cuda.synchronize()


@pytest.mark.parametrize("num_samples", [8192, 32768])
@pytest.mark.parametrize("provider", ["cuda", "triton", "reference"])
def test_gpu_mmd_forward_backward(benchmark, provider, num_samples):
    benchmark.group = f"gpu-mmd-fwd+bwd-joint-shuffle-N{num_samples}"
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(BATCH, NUM_CODEBOOKS, DIM, num_samples // BATCH, device="cuda", generator=g).requires_grad_()
    _step(x, provider)  # compile / warm up
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(_step, args=(x, provider), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(
        provider=provider,
        N=num_samples,
        device=torch.cuda.get_device_name(),
        peak_gpu_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1),
    )


@pytest.mark.parametrize("estimator,mode", [("dhsic", "joint"), ("shuffle", "pairwise"), ("dhsic", "pairwise")])
@pytest.mark.parametrize("provider", ["cuda", "triton"])
def test_gpu_mmd_modes(benchmark, provider, estimator, mode):
    benchmark.group = f"gpu-mmd-fwd+bwd-{estimator}-{mode}-N32768"
    x = torch.randn(BATCH, NUM_CODEBOOKS, DIM, 32768 // BATCH, device="cuda").requires_grad_()
    _step(x, provider, estimator=estimator, mode=mode)
    benchmark.pedantic(_step, args=(x, provider), kwargs=dict(estimator=estimator, mode=mode), rounds=3)
    benchmark.extra_info.update(provider=provider, device=torch.cuda.get_device_name())
