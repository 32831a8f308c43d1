"""Decode attention on CPU, providers side by side per size: the fused C++ kernel (`cpp`), torch's SDPA on the cache
sliced to the length (`sdpa`, this package's "sdpa" backend), torch's SDPA on the whole cache with a boolean mask
(`sdpa-mask`: reads all S_max entries, and NaN garbage past the length would leak), and the PyTorch reference.
Decoder sizes of the issue: B = 1, 4, 8; H = 8 (d = 512) and 16 (MusicGen-small, d = 1024); Dh = 64; S_max = 1500 with
lengths 250 and 1000. Every provider's output is checked against the C++ kernel's."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import mmdkernels
from benchmarks.conftest import FULL

HEAD_DIM, MAX_LEN = 64, 1500
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
if FULL:
    DTYPES["float16"] = torch.float16
    SIZES = list(itertools.product((1, 4, 8), (8, 16), (250, 1000)))  # (B, H, length)
else:
    SIZES = [(4, 8, 250)]
PROVIDERS = ["cpp", "sdpa", "sdpa-mask", "reference"]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_problem(batch: int, heads: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(batch, heads, MAX_LEN, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(batch, heads, MAX_LEN, HEAD_DIM, generator=g).to(dtype)
    return q, k, v


def sdpa_with_mask(q, k, v, length):
    mask = (torch.arange(MAX_LEN) < length)[None, None, None, :]
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask)[:, :, 0]


def cache_bytes(batch: int, heads: int, length: int, dtype: torch.dtype) -> int:
    """Bytes a decode step must read at least: the valid keys and values."""
    return 2 * batch * heads * length * HEAD_DIM * torch.finfo(dtype).bits // 8


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-H{}-L{}".format(*s))
def test_decode_attention(benchmark, size, dtype_name, provider):
    batch, heads, length = size
    dtype = DTYPES[dtype_name]
    benchmark.group = f"decode-attention-B{batch}-H{heads}-Dh{HEAD_DIM}-L{length}-S{MAX_LEN}-{dtype_name}"
    q, k, v = make_problem(batch, heads, dtype)
    if provider == "sdpa-mask":

        def step():
            return sdpa_with_mask(q, k, v, length)
    else:

        def step():
            return mmdkernels.decode_attention(q, k, v, length, backend=provider)

    out = benchmark(step)
    expected = mmdkernels.decode_attention(q, k, v, length, backend="cpp")
    torch.testing.assert_close(out.float(), expected.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(
        provider=provider,
        size=f"B={batch} H={heads} Dh={HEAD_DIM} L={length} S_max={MAX_LEN}",
        dtype=dtype_name,
        gb_per_s=round(cache_bytes(batch, heads, length, dtype) / seconds / 1e9, 2),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
