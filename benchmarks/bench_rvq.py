"""RVQ encode benchmarks, side by side in one group: the fused C++ CPU kernel, the reference (a matmul + argmin
loop per stage, like a torch.cdist loop), FAISS IndexFlatL2 searched stage by stage, and vector-quantize-pytorch's
ResidualVQ in eval mode, all on the same codebooks. Each provider's codes are checked against the fused kernel's.
"cpp" is the kernel as shipped (its tile kernel chosen by measurement); "cpp-gemm-tile" / "cpp-fused-tile" force
the score tile on the GEMM or on the micro-kernel with the argmin fused (MMDKERNELS_RVQ_TILE), side by side."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import mmdkernels
from benchmarks.conftest import FULL
from benchmarks.machine import time_vs_bare_products
from benchmarks.memory import measure_in_subprocess

DIM, NUM_ENTRIES, NUM_CODEBOOKS = 128, 2048, 4
NUM_FRAMES = 12000 if FULL else 2000  # 12,000 frames = 4 minutes at 50 Hz
MIN_AGREEMENT = 0.999  # codes may differ only at float32 near-ties between two entries


def make_problem(num_frames: int = NUM_FRAMES):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, DIM, num_frames, generator=g)
    scales = torch.logspace(0, -1, NUM_CODEBOOKS)[:, None, None]
    codebooks = torch.randn(NUM_CODEBOOKS, NUM_ENTRIES, DIM, generator=g) * scales
    return latents, codebooks


def faiss_encode(latents: torch.Tensor, codebooks: torch.Tensor, indexes) -> torch.Tensor:
    residual = latents[0].t().contiguous().numpy()
    codes = []
    for k, index in enumerate(indexes):
        _, ids = index.search(residual, 1)
        codes.append(ids[:, 0])
        residual = residual - codebooks[k].numpy()[ids[:, 0]]
    return torch.from_numpy(np.stack(codes))[None]


def vqp_model(codebooks: torch.Tensor):
    from vector_quantize_pytorch import ResidualVQ

    model = ResidualVQ(dim=DIM, num_quantizers=NUM_CODEBOOKS, codebook_size=NUM_ENTRIES).eval()
    for k, layer in enumerate(model.layers):
        layer._codebook.embed.copy_(codebooks[k][None])
        layer._codebook.initted.fill_(True)
    return model


PROVIDERS = ["cpp", "cpp-gemm-tile", "cpp-fused-tile", "reference", "faiss", "vector-quantize-pytorch"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_rvq_encode(benchmark, provider, monkeypatch):
    benchmark.group = f"rvq-encode-N{NUM_FRAMES}-D{DIM}-C{NUM_ENTRIES}-K{NUM_CODEBOOKS}"
    latents, codebooks = make_problem()
    if provider.startswith("cpp-"):
        monkeypatch.setenv("MMDKERNELS_RVQ_TILE", provider.split("-")[1])
    if provider.startswith("cpp") or provider == "reference":
        backend = "cpp" if provider.startswith("cpp") else provider

        def encode():
            return mmdkernels.rvq_encode(latents, codebooks, backend=backend)
    elif provider == "faiss":
        if importlib.util.find_spec("faiss") is None:
            pytest.skip(reason="faiss-cpu is not installed")
        import faiss

        indexes = []
        for k in range(NUM_CODEBOOKS):
            index = faiss.IndexFlatL2(DIM)
            index.add(codebooks[k].numpy())
            indexes.append(index)

        def encode():
            return faiss_encode(latents, codebooks, indexes)
    else:
        if importlib.util.find_spec("vector_quantize_pytorch") is None:
            pytest.skip(reason="vector-quantize-pytorch is not installed")
        model = vqp_model(codebooks)

        def encode():
            with torch.no_grad():
                return model(latents.transpose(1, 2))[1].transpose(1, 2)

    codes = benchmark.pedantic(encode, rounds=5, warmup_rounds=1)
    monkeypatch.delenv("MMDKERNELS_RVQ_TILE", raising=False)
    fused = mmdkernels.rvq_encode(latents, codebooks, backend="cpp")
    agreement = (codes.long() == fused).float().mean().item()
    benchmark.extra_info.update(provider=provider, frames=NUM_FRAMES, agreement_with_fused=agreement)
    # the products an encoder replaces: K stages of [N, D] @ [C, D]^T
    flops = 2.0 * NUM_FRAMES * NUM_ENTRIES * DIM * NUM_CODEBOOKS
    shape = (NUM_FRAMES, NUM_ENTRIES, DIM)
    benchmark.extra_info.update(time_vs_bare_products(benchmark.stats.stats.min, flops, shape))
    assert agreement >= MIN_AGREEMENT, f"{provider} codes agree with the fused kernel on only {agreement:.4%}"
    if provider in ("cpp", "reference"):
        setup = (
            f"import mmdkernels\nfrom benchmarks.bench_rvq import make_problem\nx, books = make_problem({NUM_FRAMES})"
        )
        call = f"mmdkernels.rvq_encode(x, books, backend={provider!r})"
        warmup = f"mmdkernels.rvq_encode(x[..., :10], books, backend={provider!r})"
        benchmark.extra_info["peak_extra_mib"] = round(measure_in_subprocess(setup, call, warmup), 1)
