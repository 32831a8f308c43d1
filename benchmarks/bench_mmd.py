"""MMD loss benchmarks: the fused C++ CPU kernel vs the materialising reference (the published computation), and
the forward pass vs the three bare N x N x (K*D) matrix products it replaces. Providers of one size share a group,
so every ratio comes from one run. Peak extra memory is measured in a fresh subprocess (benchmarks/memory.py)."""

from __future__ import annotations

import os
import platform

import pytest
import torch

import mmdkernels
from benchmarks.conftest import FULL
from benchmarks.machine import time_vs_bare_products
from benchmarks.memory import measure_in_subprocess

NUM_CODEBOOKS, DIM, BATCH = 4, 128, 8
SIZES = [1024, 4096, 8192] if FULL else [256, 1024]
REFERENCE_MAX_N = 8192  # ~7 GB of N x N matrices at 8192
LARGE_N = 65536 if FULL else 4096  # fused only: "completes in CPU memory"


def make_input(num_samples: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    shape = (BATCH, NUM_CODEBOOKS, DIM, num_samples // BATCH)
    return (torch.randn(shape, generator=g) + 0.5 * torch.randn(BATCH, 1, DIM, shape[3], generator=g)).requires_grad_()


def forward_backward(x: torch.Tensor, backend: str, **kwargs) -> None:
    x.grad = None
    mmdkernels.mmd_loss(x, generator=torch.Generator().manual_seed(0), backend=backend, **kwargs).backward()


def _info(benchmark, provider: str, num_samples: int, memory_call: str | None, steady: bool = True):
    benchmark.extra_info.update(
        provider=provider,
        N=num_samples,
        KD=NUM_CODEBOOKS * DIM,
        device=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    # against the published forward's three N x N x (K*D) products on this machine's fastest GEMM
    flops = 3 * 2.0 * num_samples**2 * NUM_CODEBOOKS * DIM
    shape = (min(num_samples, 8192), min(num_samples, 8192), NUM_CODEBOOKS * DIM)
    benchmark.extra_info.update(time_vs_bare_products(benchmark.stats.stats.min, flops, shape))
    if memory_call is not None:
        setup = f"from benchmarks.bench_mmd import make_input, forward_backward\nx = make_input({num_samples})"
        # a training step's peak: after one call of the same size (its gradient freed), so the GEMM-path choices
        # measured on the first call of each shape class (once per process) are not counted; that first call's
        # peak is recorded apart
        first_warmup = memory_call.replace("(x,", "(make_input(64),")
        peak = first_call = measure_in_subprocess(setup, memory_call, first_warmup)
        if steady:  # (else the first call's peak stands for both: a bound)
            peak = measure_in_subprocess(setup, memory_call, memory_call + "\nx.grad = None")
        benchmark.extra_info.update(peak_extra_mib=round(peak, 1), first_call_peak_extra_mib=round(first_call, 1))


@pytest.mark.parametrize("num_samples", SIZES)
@pytest.mark.parametrize("provider", ["cpp", "reference"])
def test_mmd_forward_backward(benchmark, provider, num_samples):
    if provider == "reference" and num_samples > REFERENCE_MAX_N:
        pytest.skip(reason=f"reference needs O(N^2) memory; stops at N = {REFERENCE_MAX_N}")
    benchmark.group = f"mmd-fwd+bwd-joint-shuffle-N{num_samples}"
    x = make_input(num_samples)
    rounds = 1 if provider == "reference" and num_samples >= 4096 else 3
    benchmark.pedantic(forward_backward, args=(x, provider), rounds=rounds, warmup_rounds=1 if rounds > 1 else 0)
    _info(benchmark, provider, num_samples, f"forward_backward(x, {provider!r})")


@pytest.mark.parametrize("estimator,mode", [("dhsic", "joint"), ("shuffle", "pairwise"), ("dhsic", "pairwise")])
def test_mmd_other_modes(benchmark, estimator, mode):
    num_samples = SIZES[-1]
    benchmark.group = f"mmd-fwd+bwd-modes-N{num_samples}"
    x = make_input(num_samples)
    benchmark.pedantic(forward_backward, args=(x, "cpp"), kwargs=dict(estimator=estimator, mode=mode), rounds=2)
    _info(benchmark, f"cpp-{estimator}-{mode}", num_samples, None)


@pytest.mark.parametrize("provider", ["cpp-forward", "torch.mm-x3"])
def test_mmd_forward_vs_matmul_bound(benchmark, provider):
    """The forward pass against the three N x N x (K*D) float32 products of the published computation."""
    num_samples = SIZES[-1]
    benchmark.group = f"mmd-forward-vs-3mm-N{num_samples}"
    x = make_input(num_samples).detach()
    if provider == "torch.mm-x3":
        flat = torch.randn(num_samples, NUM_CODEBOOKS * DIM)
        other = torch.randn(num_samples, NUM_CODEBOOKS * DIM)

        def three_products():
            return flat @ flat.t(), other @ other.t(), flat @ other.t()

        benchmark.pedantic(three_products, rounds=3, warmup_rounds=1)
        flops = 3 * 2 * num_samples**2 * NUM_CODEBOOKS * DIM
        benchmark.extra_info["gflops_per_s"] = round(flops / benchmark.stats.stats.min / 1e9, 1)
    else:
        benchmark.pedantic(
            lambda: mmdkernels.mmd_loss(x, generator=torch.Generator().manual_seed(0), backend="cpp"),
            rounds=3,
            warmup_rounds=1,
        )
    _info(benchmark, provider, num_samples, None)


def test_mmd_large_n_completes(benchmark):
    """The fused loss at a size whose N x N matrices would not fit (65536^2 floats = 16 GiB each)."""
    benchmark.group = f"mmd-fwd+bwd-large-N{LARGE_N}"
    x = make_input(LARGE_N)
    benchmark.pedantic(forward_backward, args=(x, "cpp"), rounds=1)
    assert torch.isfinite(x.grad).all()
    _info(
        benchmark,
        "cpp",
        LARGE_N,
        "forward_backward(x, 'cpp')" if os.environ.get("MMDKERNELS_BENCH_MEMORY_LARGE") else None,
        steady=False,  # one more call of minutes: the first call's peak (a bound) stands for it
    )
