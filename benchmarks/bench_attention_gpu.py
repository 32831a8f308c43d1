"""GPU decode attention, providers side by side per size: the CUDA split-K kernel, the Triton kernel and torch's SDPA
(on the cache sliced to the length, this package's "sdpa" backend), bfloat16. Decoder sizes of the issue (B = 1, 4, 8;
H = 8 and 16; Dh = 64; S_max = 1500, lengths 250 and 1000) plus a batch of 64 sequences. Outputs are checked against
SDPA's."""

from __future__ import annotations

import itertools

import pytest
import torch

import mmdkernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
HEAD_DIM, MAX_LEN = 64, 1500
SIZES = [*itertools.product((1, 4, 8), (8, 16), (250, 1000)), (64, 16, 1000)]  # (B, H, length)
PROVIDERS = ["cuda", "triton", "sdpa"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-H{}-L{}".format(*s))
def test_gpu_decode_attention(benchmark, size, provider):
    batch, heads, length = size
    benchmark.group = f"gpu-decode-attention-B{batch}-H{heads}-Dh{HEAD_DIM}-L{length}-S{MAX_LEN}-bfloat16"
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, heads, MAX_LEN, HEAD_DIM)
    q = torch.randn(batch, heads, HEAD_DIM, device="cuda", generator=g).bfloat16()
    k = torch.randn(shape, device="cuda", generator=g).bfloat16()
    v = torch.randn(shape, device="cuda", generator=g).bfloat16()
    lengths = torch.full((batch,), length, device="cuda")  # a device tensor: no host sync in the kernels' path

    def step():
        out = mmdkernels.decode_attention(q, k, v, length if provider == "sdpa" else lengths, backend=provider)
        torch.cuda.synchronize()
        return out

    step()
    out = benchmark.pedantic(step, rounds=50, iterations=10, warmup_rounds=2)
    expected = mmdkernels.decode_attention(q, k, v, length, backend="sdpa")
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    cache_bytes = 2 * batch * heads * length * HEAD_DIM * 2
    benchmark.extra_info.update(
        provider=provider,
        size=f"B={batch} H={heads} Dh={HEAD_DIM} L={length} S_max={MAX_LEN}",
        gb_per_s=round(cache_bytes / benchmark.stats.stats.min / 1e9, 1),
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
    )
