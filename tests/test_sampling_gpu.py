"""mmdkernels.sample on the GPU backends (CUDA kernel, compiled Triton) against the reference; only where a CUDA
device exists. Greedy and top-k = 1 are exact; otherwise a token may differ from the reference's only where the
GPU's exp() or summation order moves a top-p or inverse-CDF boundary across u (rare: at most MAX_MISMATCH of rows)."""

import math

import pytest
import torch

import mmdkernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
BACKENDS = ["cuda", "triton"]
MAX_MISMATCH = 1e-3
SETTINGS = [(1.0, 0, 1.0), (0.7, 250, 1.0), (1.3, 0, 0.9), (1.0, 5, 0.5), (1.0, 1, 1.0), (1.0, 0, 1e-9)]


def problem(batch, num_codebooks, vocab, cfg, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = 2 * batch if cfg else batch
    logits = (3.0 * torch.randn(rows, num_codebooks, vocab, device="cuda", generator=g)).to(dtype)
    uniforms = torch.rand(batch, num_codebooks, dtype=torch.float64, device="cuda", generator=g)
    return logits, uniforms


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", [None, 3.0])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 4, 7), (64, 4, 2048), (16, 4, 2049), (8, 2, 32000)], ids=str)
def test_gpu_tokens_match_reference(backend, shape, cfg, dtype):
    for i, (temperature, top_k, top_p) in enumerate(SETTINGS):
        logits, u = problem(*shape, cfg, dtype, seed=i)
        kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=cfg, uniforms=u)
        expected = mmdkernels.sample(logits.cpu(), backend="reference", **{**kwargs, "uniforms": u.cpu()})
        tokens = mmdkernels.sample(logits, backend=backend, **kwargs).cpu()
        if top_k == 1 or top_p < 1e-6:
            assert torch.equal(tokens, expected)
        else:
            assert (tokens != expected).float().mean().item() <= MAX_MISMATCH, kwargs
    greedy = mmdkernels.sample(logits, temperature=0.0, cfg_coef=cfg, backend=backend)
    assert torch.equal(
        greedy.cpu(), mmdkernels.sample(logits.cpu(), temperature=0.0, cfg_coef=cfg, backend="reference")
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_ties_and_edges(backend):
    flat = torch.zeros(1, 1, 10, device="cuda")
    almost_one = torch.full((1, 1), 1 - 2**-53, dtype=torch.float64, device="cuda")
    assert mmdkernels.sample(flat, uniforms=almost_one * 0, backend=backend).item() == 0
    assert mmdkernels.sample(flat, uniforms=almost_one, backend=backend).item() == 9
    assert mmdkernels.sample(flat, top_k=4, uniforms=almost_one, backend=backend).item() == 3
    assert mmdkernels.sample(flat, top_p=0.35, uniforms=almost_one, backend=backend).item() == 3
    assert mmdkernels.sample(flat, temperature=0, backend=backend).item() == 0
    g = torch.Generator(device="cuda").manual_seed(4)
    logits = torch.randn(4000, 2, 30, device="cuda", generator=g)
    logits[..., ::2] = -math.inf
    logits[:2000, :, 1] = -math.inf
    for kwargs in (dict(), dict(top_k=25), dict(top_p=0.99), dict(temperature=0.0)):
        tokens = mmdkernels.sample(logits, cfg_coef=2.5, generator=g, backend=backend, **kwargs)
        assert (tokens % 2 == 1).all() and (tokens != 1).all()
    bad = torch.randn(2, 2, 8, device="cuda")
    bad[1, 1, 3] = math.nan
    with pytest.raises(ValueError, match=r"row \(b=1, k=1\)"):
        mmdkernels.sample(bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_draw_frequencies(backend):
    """400k draws of one row: every kept token's frequency within 5 sigma of its probability, banned ones never."""
    draws, vocab = 400_000, 50
    g = torch.Generator(device="cuda").manual_seed(7)
    row = torch.randn(1, 1, vocab, device="cuda", generator=g)
    kwargs = dict(temperature=0.9, top_k=30, top_p=0.9)
    tokens = mmdkernels.sample(row.expand(draws, 1, vocab), generator=g, backend=backend, **kwargs)
    probs = mmdkernels.sampling.kept_distribution_ref(row.cpu(), **kwargs)[0, 0]
    freq = torch.bincount(tokens.flatten().cpu(), minlength=vocab).double() / draws
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert (freq[probs == 0] == 0).all()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-12).all()
