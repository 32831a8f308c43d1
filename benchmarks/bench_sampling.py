"""Fused sampling on the CPU, one group: the C++ kernel vs the PyTorch reference on one MusicGen decode step:
B = 16 sequences with CFG (32 logit rows), K = 4 codebooks, V = 2048, temperature 1; top-k 250 (MusicGen's default)
and top-p 0.9. Both providers get the same uniforms, and their tokens are checked to be identical."""

from __future__ import annotations

import pytest
import torch

import mmdkernels
from benchmarks.conftest import FULL

BATCH, NUM_CODEBOOKS, VOCAB, CFG_COEF = 16, 4, 2048, 3.0
MODES = {"top_k=250": dict(top_k=250), "top_p=0.9": dict(top_p=0.9)}


def make_step():
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(2 * BATCH, NUM_CODEBOOKS, VOCAB, generator=g)
    uniforms = torch.rand(BATCH, NUM_CODEBOOKS, dtype=torch.float64, generator=g)
    return logits, uniforms


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("provider", ["cpp", "reference"])
def test_sample(benchmark, provider, mode):
    benchmark.group = f"sample-B{BATCH}-cfg-K{NUM_CODEBOOKS}-V{VOCAB}"
    logits, uniforms = make_step()
    kwargs = dict(cfg_coef=CFG_COEF, uniforms=uniforms, backend=provider, **MODES[mode])
    tokens = benchmark.pedantic(
        lambda: mmdkernels.sample(logits, **kwargs), rounds=50 if FULL else 20, warmup_rounds=2, iterations=1
    )
    assert torch.equal(tokens, mmdkernels.sample_ref(logits, **{k: v for k, v in kwargs.items() if k != "backend"}))
    mean_s = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        provider=provider,
        mode=mode,
        logit_rows=2 * BATCH * NUM_CODEBOOKS,
        logits_gb_per_s=round(logits.numel() * 4 / mean_s / 1e9, 3),
        threads=torch.get_num_threads(),
    )
