"""Few-row linear layers of a decode step on the CPU: mmdkernels.decode_linear (C++, weights streamed once) vs
F.linear (torch's GEMM, which packs the weight panel on every call).

One round multiplies M rows by a model's worth of weight matrices: 32 matrices of 2048 x 512 float32 (128 MiB, the
linear layers of the d = 512, 8-layer decoder of bench_decode.py), more than the caches hold, as in a real decode
step. Reported: ms per round and the weight bytes streamed per second. Threads: MMDKERNELS_BENCH_THREADS (default 1,
as bench_decode.py). CI size: 4 matrices."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import mmdkernels
from benchmarks.conftest import FULL

MATRICES = 32 if FULL else 4
OUT_FEATURES, IN_FEATURES = 2048, 512
THREADS = int(os.environ.get("MMDKERNELS_BENCH_THREADS", "1"))
PROVIDERS = {
    "cpp": lambda x, w: mmdkernels.decode_linear(x, w, backend="cpp"),
    "torch": lambda x, w: F.linear(x, w),
}


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(OUT_FEATURES, IN_FEATURES, generator=g) for _ in range(MATRICES)]


@pytest.mark.parametrize("rows", [1, 4, 8, 16])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_decode_linear(benchmark, weights, provider, rows):
    benchmark.group = f"decode-linear-M{rows}-{MATRICES}x{OUT_FEATURES}x{IN_FEATURES}"
    x = torch.randn(rows, IN_FEATURES, generator=torch.Generator().manual_seed(1))
    linear = PROVIDERS[provider]
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torch.no_grad():
            outputs = benchmark.pedantic(
                lambda: [linear(x, w) for w in weights], rounds=20 if FULL else 5, warmup_rounds=2, iterations=1
            )
    finally:
        torch.set_num_threads(threads)
    for y, w in zip(outputs, weights):
        torch.testing.assert_close(y, F.linear(x, w), rtol=1e-4, atol=1e-4)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    benchmark.extra_info.update(
        provider=provider,
        rows=rows,
        weight_mib=nbytes / 2**20,
        weight_gb_per_s=round(nbytes / benchmark.stats.stats.min / 1e9, 2),
        threads=THREADS,
    )
