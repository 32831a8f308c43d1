"""Triton backend of mmdkernels.sample (mmdkernels/sampling/triton_kernels.py) against the reference: the same
tokens given the same uniforms. Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1), so shapes are small
and rows few; the statistical test lives in test_sampling.py (token equality carries it over)."""

import math

import pytest
import torch
from triton_cases import interpreter_marks

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")
pytestmark = interpreter_marks("tests/test_sampling_gpu.py")

import mmdkernels  # noqa: E402
from mmdkernels.sampling import sample_ref  # noqa: E402

SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.7, 5, 1.0),
    (1.3, 0, 0.9),
    (1.0, 3, 0.5),
    (0.0, 0, 1.0),
    (1.0, 1, 1.0),
    (1.0, 0, 1e-9),
    (2.0, 500, 0.99),
]


def make_logits(rows, num_codebooks, vocab, seed, dtype=torch.float32, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:
        return torch.randint(-4, 3, (rows, num_codebooks, vocab), generator=g).to(dtype)
    return (3.0 * torch.randn(rows, num_codebooks, vocab, generator=g)).to(dtype)


def uniforms_for(batch, num_codebooks, seed):
    return torch.rand(batch, num_codebooks, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def assert_same_tokens(logits, **kwargs):
    expected = sample_ref(logits, **kwargs)
    tokens = mmdkernels.sample(logits, backend="triton", **kwargs)
    assert torch.equal(tokens, expected), kwargs


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 2), (1, 2, 37), (1, 1, 130)], ids=str)
def test_tokens_match_reference(shape):
    """Every setting, alternately with and without CFG and with contiguous / non-contiguous logits."""
    batch, num_codebooks, vocab = shape
    for i, (temperature, top_k, top_p) in enumerate(SETTINGS):
        cfg = 2.5 if i % 2 == 0 else None
        logits = make_logits(2 * batch if cfg else batch, num_codebooks, vocab, seed=i)
        if i % 4 < 2:
            logits = logits.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous
        u = uniforms_for(batch, num_codebooks, seed=i)
        assert_same_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=cfg, uniforms=u)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_logits(dtype):
    logits = make_logits(2, 1, 50, seed=5, dtype=dtype)
    for temperature, top_k, top_p in SETTINGS[:4]:
        u = uniforms_for(1, 1, seed=top_k)
        assert_same_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=3.0, uniforms=u)


def test_more_than_one_tile():
    """V = 2049 spans three 1024-wide tiles (the last holding one token)."""
    logits = make_logits(1, 1, 2049, seed=9)
    u = uniforms_for(1, 1, seed=9)
    for temperature, top_k, top_p in [(0.0, 0, 1.0), (1.0, 250, 1.0), (0.8, 0, 0.9)]:
        assert_same_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, uniforms=u)


def test_ties_under_top_k_and_top_p():
    logits = make_logits(2, 2, 16, seed=3, integer=True)
    u = uniforms_for(1, 2, seed=3)
    for top_k, top_p in [(1, 1.0), (2, 1.0), (5, 0.3), (0, 0.3), (16, 0.95), (3, 1e-6)]:
        assert_same_tokens(logits, temperature=0.5, top_k=top_k, top_p=top_p, cfg_coef=1.5, uniforms=u)
    assert_same_tokens(logits, temperature=0.0, cfg_coef=1.5, uniforms=u)


def test_edge_cases():
    flat = torch.zeros(1, 1, 10)
    almost_one = torch.full((1, 1), 1 - 2**-53, dtype=torch.float64)
    zero = torch.zeros(1, 1, dtype=torch.float64)
    assert mmdkernels.sample(flat, uniforms=zero, backend="triton").item() == 0
    assert mmdkernels.sample(flat, uniforms=almost_one, backend="triton").item() == 9
    assert mmdkernels.sample(flat, top_k=4, uniforms=almost_one, backend="triton").item() == 3
    assert mmdkernels.sample(flat, top_p=0.35, uniforms=almost_one, backend="triton").item() == 3
    assert mmdkernels.sample(flat, temperature=0, backend="triton").item() == 0
    banned = make_logits(6, 2, 12, seed=4)
    banned[..., ::2] = -math.inf
    banned[:3, :, 1] = -math.inf  # banned in the conditional half only
    for kwargs in (dict(), dict(top_k=4), dict(top_p=0.9), dict(temperature=0.0)):
        g = torch.Generator().manual_seed(1)
        tokens = mmdkernels.sample(banned, cfg_coef=2.0, generator=g, backend="triton", **kwargs)
        assert (tokens % 2 == 1).all() and (tokens != 1).all(), kwargs


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter on a +inf row
def test_invalid_rows_are_marked_and_raise():
    from mmdkernels.sampling import ops

    logits = make_logits(3, 2, 8, seed=2)
    logits[0, 1, 2] = math.nan
    logits[1, 0, 3] = math.inf
    logits[2, 0] = -math.inf
    u = uniforms_for(3, 2, seed=2)
    tokens = ops.sample_op("triton")(logits, u, 1.0, 0, 1.0, 0.0, False)
    assert tokens.tolist()[0][1] == -1 and tokens.tolist()[1][0] == -1 and tokens.tolist()[2][0] == -1
    assert (tokens[:, 1][1:] >= 0).all() and tokens[0, 0] >= 0
    with pytest.raises(ValueError, match="no distribution to sample"):
        mmdkernels.sample(logits, uniforms=u, backend="triton")


def test_opcheck():
    from mmdkernels.sampling import ops

    u = uniforms_for(1, 1, seed=0)
    torch.library.opcheck(ops.sample_op("triton"), (make_logits(2, 1, 8, seed=0), u, 0.9, 4, 0.8, 2.0, True))
