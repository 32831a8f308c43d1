"""mmdkernels.sample through the public API: the C++ kernel against the reference (same uniforms -> same tokens),
the drawn distribution (chi-square), edge cases, reproducibility, bad input, opcheck and torch.compile.

Token equality is exact: every backend mixes and scales in float32 with the same roundings, ranks by the same keys
and sums masses in float64, so only an exp() differing by an ulp right at a top-p or inverse-CDF boundary could
flip a token (probability ~1e-7 per row, far below these tests' row counts).
"""

import math

import pytest
import torch

import mmdkernels
from mmdkernels._ext import cpu_extension
from mmdkernels.sampling import kept_distribution_ref, sample_ref

pytestmark = pytest.mark.skipif(cpu_extension() is None, reason="the C++ extension is not built")

# (B, K, V): V = 1, 2, odd, prime, a power of two and one past it, a real vocabulary size.
SHAPES = [(1, 1, 1), (2, 3, 2), (3, 4, 7), (2, 2, 37), (2, 4, 2048), (1, 3, 2049), (1, 2, 32000)]
# (temperature, top_k, top_p)
SETTINGS = [
    (1.0, 0, 1.0),
    (0.7, 250, 1.0),
    (1.3, 0, 0.9),
    (1.0, 5, 0.5),
    (0.0, 0, 1.0),
    (1.0, 1, 1.0),
    (1.0, 0, 1e-9),
    (2.0, 40000, 0.99),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CHI2_FALSE_ALARM = 1e-6  # per chi-square test (a fresh seed would fail it this rarely)


def make_logits(batch, num_codebooks, vocab, *, cfg, dtype=torch.float32, seed=0, integer=False, strided=False):
    """Random logits [B or 2B, K, V]; integer=True makes many exact ties; strided=True a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * batch if cfg else batch
    if integer:
        x = torch.randint(-4, 3, (rows, num_codebooks, vocab), generator=g).float()
    else:
        x = 3.0 * torch.randn(rows, num_codebooks, vocab, generator=g)
    if strided:
        x = torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]  # stride 2 along V
    return x.to(dtype)


def uniforms_for(batch, num_codebooks, seed=1):
    return torch.rand(batch, num_codebooks, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", [None, 3.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tokens_match_reference(shape, cfg, dtype):
    batch, num_codebooks, vocab = shape
    for i, (temperature, top_k, top_p) in enumerate(SETTINGS):
        logits = make_logits(*shape, cfg=cfg, dtype=dtype, seed=i, strided=i % 2 == 1)
        u = uniforms_for(batch, num_codebooks, seed=i)
        kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=cfg, uniforms=u)
        expected = sample_ref(logits, **kwargs)
        tokens = mmdkernels.sample(logits, backend="cpp", **kwargs)
        assert tokens.dtype == torch.int64 and tokens.shape == (batch, num_codebooks)
        assert torch.equal(tokens, expected), (temperature, top_k, top_p)


@pytest.mark.parametrize("vocab", [1, 3, 16, 37])
def test_every_setting_combination_with_ties(vocab):
    """Integer logits (many exact ties) under every temperature x top-k x top-p, many rows: ties break the same way."""
    logits = make_logits(8, 3, vocab, cfg=True, integer=True, seed=vocab)
    u = uniforms_for(8, 3, seed=vocab)
    for temperature in (0.0, 0.5, 1.0, 2.0):
        for top_k in sorted({0, 1, 2, 5, vocab, vocab + 3}):
            for top_p in (1e-6, 0.3, 0.95, 1.0):
                kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=1.5, uniforms=u)
                assert torch.equal(mmdkernels.sample(logits, backend="cpp", **kwargs), sample_ref(logits, **kwargs))


def test_top_k_boundary_among_signed_zeros_negatives_and_infinities():
    """top-k's k-th largest (found by bisection on order keys in the C++ kernel) wherever k falls: among ties of
    -0.0 and +0.0 (equal logits), negative values (whose keys are bit-inverted), subnormals, huge values and -inf
    (never drawn): the same tokens as the reference, for every k."""
    g = torch.Generator().manual_seed(5)
    values = torch.tensor([float("-inf"), -1e38, -3.5, -1e-40, -0.0, 0.0, 1e-40, 2.0, 1e38])
    logits = values[torch.randint(0, len(values), (6, 2, 64), generator=g)]
    logits[0, 0] = -0.0  # a row of ties only
    logits[0, 1] = -7.0  # all negative and equal
    u = uniforms_for(6, 2, seed=3)
    for temperature in (1.0, 0.5):
        for top_k in range(1, 66):
            kwargs = dict(temperature=temperature, top_k=top_k, uniforms=u)
            assert torch.equal(mmdkernels.sample(logits, backend="cpp", **kwargs), sample_ref(logits, **kwargs)), top_k


def chi2_quantile(df: int, upper_tail: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (good to ~1% for df >= 3)."""
    z = -math.sqrt(2.0) * torch.erfinv(torch.tensor(2.0 * upper_tail - 1.0, dtype=torch.float64)).item()
    return df * (1.0 - 2.0 / (9.0 * df) + z * math.sqrt(2.0 / (9.0 * df))) ** 3


@pytest.mark.parametrize(
    "temperature, top_k, top_p, cfg",
    [(1.0, 0, 1.0, None), (0.8, 6, 1.0, None), (1.2, 0, 0.8, 2.0), (1.0, 9, 0.9, 3.0)],
)
def test_draws_follow_the_kept_distribution(temperature, top_k, top_p, cfg):
    """Many draws of one row (repeated over B): frequencies pass a chi-square test against the kept, renormalised
    distribution at false-alarm rate CHI2_FALSE_ALARM; tokens outside the kept set are never drawn."""
    vocab, draws = 23, 40000
    row = make_logits(1, 1, vocab, cfg=cfg, seed=7) / 6.0  # std 0.5: a spread-out distribution
    halves = row.chunk(2) if cfg else (row,)
    logits = torch.cat([h.expand(draws, 1, vocab) for h in halves])
    probs = kept_distribution_ref(row, temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=cfg)[0, 0]
    g = torch.Generator().manual_seed(11)
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_coef=cfg, generator=g)
    tokens = mmdkernels.sample(logits, backend="cpp", **kwargs)
    counts = torch.bincount(tokens.flatten(), minlength=vocab).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0
    assert int(kept.sum()) >= 4  # enough categories for the chi-square approximation
    expected = draws * probs[kept]
    statistic = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert statistic < chi2_quantile(int(kept.sum()) - 1, CHI2_FALSE_ALARM)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_edge_cases(backend):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, 50, generator=g)
    argmax = logits.argmax(-1)
    u = uniforms_for(4, 3)
    assert torch.equal(mmdkernels.sample(logits, top_k=1, uniforms=u, backend=backend), argmax)
    assert torch.equal(mmdkernels.sample(logits, top_p=1e-12, uniforms=u, backend=backend), argmax)
    assert torch.equal(mmdkernels.sample(logits, temperature=0, top_k=3, uniforms=u, backend=backend), argmax)
    # u = 0 draws the first kept token in vocabulary order; u just below 1 the last one.
    flat = torch.zeros(1, 1, 10)
    zero, almost_one = torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), 1 - 2**-53, dtype=torch.float64)
    assert mmdkernels.sample(flat, uniforms=zero, backend=backend).item() == 0
    assert mmdkernels.sample(flat, uniforms=almost_one, backend=backend).item() == 9
    # All-equal logits: top-k keeps the lowest indices; top-p = 0.35 keeps ranks j with j / 10 < 0.35: 0..3.
    assert mmdkernels.sample(flat, top_k=4, uniforms=almost_one, backend=backend).item() == 3
    assert mmdkernels.sample(flat, top_p=0.35, uniforms=almost_one, backend=backend).item() == 3
    assert mmdkernels.sample(flat, temperature=0, backend=backend).item() == 0
    # V = 1.
    assert mmdkernels.sample(torch.randn(2, 2, 1), uniforms=uniforms_for(2, 2), backend=backend).eq(0).all()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_minus_inf_tokens_are_never_drawn(backend):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2000, 2, 30, generator=g)
    logits[..., ::2] = -math.inf  # even tokens banned
    logits[:1000, :, 1] = -math.inf  # token 1 banned in the conditional half only: still banned after CFG
    for kwargs in (dict(), dict(top_k=25), dict(top_p=0.99), dict(cfg_coef=2.5), dict(temperature=0.0)):
        tokens = mmdkernels.sample(logits, generator=torch.Generator().manual_seed(5), backend=backend, **kwargs)
        assert (tokens % 2 == 1).all()
        if "cfg_coef" in kwargs:
            assert (tokens != 1).all()
    underflow = torch.zeros(1, 1, 4)
    underflow[..., 2] = 200.0  # the other tokens' exp() underflows to 0: kept by top-k, but never drawn
    for u in (0.0, 0.5, 1 - 2**-53):
        uniforms = torch.full((1, 1), u, dtype=torch.float64)
        assert mmdkernels.sample(underflow, top_k=4, uniforms=uniforms, backend=backend).item() == 2


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_invalid_rows_raise(backend, value):
    logits = torch.randn(4, 2, 8)
    logits[3, 1, 5] = value
    with pytest.raises(ValueError, match=r"row \(b=1, k=1\).*NaN or \+inf"):
        mmdkernels.sample(logits, cfg_coef=2.0, backend=backend)
    logits = torch.randn(2, 2, 8)
    logits[1, 0] = -math.inf
    with pytest.raises(ValueError, match=r"row \(b=1, k=0\).*every token is -inf"):
        mmdkernels.sample(logits, backend=backend)
    with pytest.raises(ValueError, match=r"every token is -inf"):
        mmdkernels.sample(logits, temperature=0, backend=backend)


def test_compiled_op_marks_invalid_rows():
    """The op itself returns -1 for rows it cannot sample (what the Python layer turns into the error)."""
    logits = torch.randn(3, 2, 8)
    logits[0, 1, 2] = math.nan
    logits[2, 0] = -math.inf
    tokens = torch.ops.mmdkernels.sample_tokens(logits, uniforms_for(3, 2), 1.0, 0, 1.0, 0.0, False)
    assert tokens[0, 1] == -1 and tokens[2, 0] == -1 and (tokens[1] >= 0).all()


def test_reproducible_with_a_seeded_generator():
    logits = make_logits(4, 4, 300, cfg=True)
    kwargs = dict(temperature=0.9, top_k=50, top_p=0.95, cfg_coef=3.0)
    first = mmdkernels.sample(logits, generator=torch.Generator().manual_seed(42), backend="cpp", **kwargs)
    again = mmdkernels.sample(logits, generator=torch.Generator().manual_seed(42), backend="cpp", **kwargs)
    other = mmdkernels.sample(logits, generator=torch.Generator().manual_seed(43), backend="cpp", **kwargs)
    reference = sample_ref(logits, generator=torch.Generator().manual_seed(42), **kwargs)
    assert torch.equal(first, again) and torch.equal(first, reference)
    assert not torch.equal(first, other)
    # The generator draws u = torch.rand([B, K], float64): passing those uniforms gives the same tokens.
    u = torch.rand(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(42))
    assert torch.equal(mmdkernels.sample(logits, uniforms=u, backend="cpp", **kwargs), first)
    u32 = u.float()  # float32 uniforms are accepted and used exactly
    assert torch.equal(
        mmdkernels.sample(logits, uniforms=u32, backend="cpp", **kwargs), sample_ref(logits, uniforms=u32, **kwargs)
    )


GOOD = torch.randn(2, 3, 11)


@pytest.mark.parametrize(
    "logits, kwargs, error, match",
    [
        ([[1.0]], {}, TypeError, "logits must be a torch.Tensor"),
        (torch.randint(0, 5, (2, 3, 11)), {}, TypeError, "logits must be a floating tensor"),
        (torch.randn(2, 11), {}, ValueError, r"logits must have shape \[B, K, V\]"),
        (torch.randn(2, 3, 0), {}, ValueError, r"logits must have shape \[B, K, V\]"),
        (torch.randn(3, 3, 11), {"cfg_coef": 3.0}, ValueError, "even number of rows"),
        (GOOD, {"top_k": -1}, ValueError, "top_k must be an int >= 0"),
        (GOOD, {"top_k": 2.5}, ValueError, "top_k must be an int >= 0"),
        (GOOD, {"top_p": 0.0}, ValueError, r"top_p must be a number in \(0, 1\]"),
        (GOOD, {"top_p": 1.5}, ValueError, r"top_p must be a number in \(0, 1\]"),
        (GOOD, {"temperature": -0.5}, ValueError, "temperature must be a finite number >= 0"),
        (GOOD, {"temperature": math.inf}, ValueError, "temperature must be a finite number >= 0"),
        (GOOD, {"cfg_coef": math.nan}, ValueError, "cfg_coef must be a finite number"),
        (GOOD, {"uniforms": torch.rand(3, 2)}, ValueError, r"uniforms must have shape \[B, K\] = \(2, 3\)"),
        (GOOD, {"uniforms": torch.zeros(2, 3, dtype=torch.int64)}, TypeError, "uniforms must be a float32/float64"),
        (GOOD, {"uniforms": torch.full((2, 3), 1.0)}, ValueError, r"uniforms must lie in \[0, 1\)"),
        (GOOD, {"uniforms": torch.full((2, 3), -0.1)}, ValueError, r"uniforms must lie in \[0, 1\)"),
        (GOOD, {"generator": 3}, TypeError, "generator must be a torch.Generator"),
        (GOOD, {"backend": "fortran"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input_raises(logits, kwargs, error, match):
    for sampler in (mmdkernels.sample, sample_ref):
        if sampler is sample_ref and "backend" in kwargs:
            continue
        with pytest.raises(error, match=match):
            sampler(logits, **kwargs)


def test_compiled_op_checks_its_arguments():
    op = torch.ops.mmdkernels.sample_tokens
    with pytest.raises(RuntimeError, match="uniforms must have shape"):
        op(GOOD, torch.rand(2, 2, dtype=torch.float64), 1.0, 0, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="uniforms must have dtype"):
        op(GOOD, torch.rand(2, 3), 1.0, 0, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="even number of rows"):
        op(torch.randn(3, 3, 11), torch.rand(1, 3, dtype=torch.float64), 1.0, 0, 1.0, 2.0, True)
    with pytest.raises(RuntimeError, match="top_p must be in"):
        op(GOOD, torch.rand(2, 3, dtype=torch.float64), 1.0, 0, 0.0, 0.0, False)


def test_opcheck():
    from mmdkernels.sampling import ops

    op = ops.sample_op("cpp")
    u = uniforms_for(2, 3)
    for args in [
        (make_logits(2, 3, 40, cfg=False), u, 1.0, 0, 1.0, 0.0, False),
        (make_logits(2, 3, 40, cfg=True, dtype=torch.bfloat16), u, 0.7, 5, 0.9, 3.0, True),
        (make_logits(2, 3, 40, cfg=False), u, 0.0, 0, 1.0, 0.0, False),
    ]:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    """A decode step calling sample traces into one graph (eager-only checks skipped), with caller-given uniforms
    or torch's global generator. (A torch.Generator argument is not traceable by dynamo: pass uniforms= instead.)"""
    logits = make_logits(2, 4, 100, cfg=True)
    u = uniforms_for(2, 4)

    def step(logits, u):
        return mmdkernels.sample(logits, temperature=0.9, top_k=20, top_p=0.9, cfg_coef=3.0, uniforms=u, backend="cpp")

    def step_global_rng(logits):
        return mmdkernels.sample(logits, top_k=20, cfg_coef=3.0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(logits, u), step(logits, u))
    compiled_global_rng = torch.compile(step_global_rng, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    tokens = compiled_global_rng(logits)
    torch.manual_seed(0)
    assert torch.equal(tokens, step_global_rng(logits))
