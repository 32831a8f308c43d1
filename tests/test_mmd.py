"""Every available MMD backend against the float64 reference: loss and gradient, all modes and estimators."""

from __future__ import annotations

import importlib.util
import itertools
import math

import pytest
import torch
from mmd_cases import (
    OPTIONS,
    assert_close_to_reference,
    assert_loss_close,
    loss_scale,
    make_input,
    option_id,
    run,
    valid,
)
from tolerances import assert_close_to_reference as assert_rule

import mmdkernels
from mmdkernels import _dispatch
from mmdkernels.mmd import reference as ref

# every test once per GEMM provider of the C++ kernels (tests/conftest.py), forced
# the C++ kernel's tests run once per GEMM provider (each_gemm_path, tests/conftest.py); Triton and the reference
# have no GEMM path, so they run in the first pass only


def gemm_pass_backends(backends: list[str], gemm_path) -> list[str]:
    return backends if gemm_path in (None, "mkl") else [b for b in backends if b == "cpp"]


def cpu_backends(max_n: int) -> list[str]:
    """Backends that can run on CPU tensors here; Triton (interpreted) only for small N."""
    backends = ["cpp"]
    if max_n <= 64 and importlib.util.find_spec("triton") is not None and _dispatch.triton_interpreter_enabled():
        backends.append("triton")
    return backends


SHAPES = [(1, 1, 1, 2), (2, 2, 3, 5), (3, 3, 5, 7), (2, 4, 17, 11), (5, 2, 8, 13)]
LARGER_SHAPES = [(4, 4, 32, 129), (3, 2, 128, 200), (2, 8, 16, 261)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("delay", [False, True])
def test_small_shapes_match_reference(shape, options, delay, each_gemm_path):
    if not valid(shape, options, delay):
        pytest.skip(
            reason=f"shape {shape} is not a valid input for {options}, delay={delay} (tested in test_bad_input)"
        )
    x = make_input(shape)
    for backend in gemm_pass_backends(cpu_backends(max_n=shape[0] * shape[3]), each_gemm_path):
        assert_close_to_reference(x, backend, delay=delay, **options)


@pytest.mark.parametrize("shape", LARGER_SHAPES)
@pytest.mark.parametrize("options", OPTIONS[:4], ids=option_id)
def test_larger_shapes_match_reference(shape, options, each_gemm_path):
    """N past the 256-column chunk and several row blocks' worth of rows."""
    x = make_input(shape)
    assert_close_to_reference(x, "cpp", delay=True, **options)


@pytest.mark.parametrize("seed", [2, 7, 9])
@pytest.mark.parametrize("options", OPTIONS[:4], ids=option_id)
def test_duplicate_frames_under_delay_match_reference(seed, options, each_gemm_path):
    """K = 2, D = 128, duplicate frames, delay alignment: x and y (and, per codebook, x and x) samples that are exact
    duplicates. The expanded distance |a|^2 + |b|^2 - 2ab gives them d ~ 1e-4 instead of 0 and a large kernel weight
    on a - b = 0, which the GEMM form of the gradient cancels only to float32 rounding of that weight: the shuffle
    gradient was off by 7e-4..1.5e-3 of max |grad| (PyTorch float32: 1.5e-6), over the rule's bound."""
    x = make_input((3, 2, 128, 50), seed=seed)
    assert_close_to_reference(x, "cpp", delay=True, **options)


def test_many_row_blocks_match_reference(monkeypatch, each_gemm_path):
    """N = 2052: the CPU kernel's tile budget splits the rows into several blocks (the last one partial)."""
    x = make_input((4, 2, 4, 513), seed=3)
    for options in (OPTIONS[0], OPTIONS[2]):
        assert_close_to_reference(x, "cpp", **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ["shuffle", "dhsic"])
def test_low_precision_inputs(dtype, estimator):
    """bf16/fp16 inputs are standardised and reduced in float32, the gradient rounded to the input dtype: the rule
    on the same rounded input, with PyTorch's reference doing the same (mmd_cases.assert_close_to_reference)."""
    x = make_input((3, 3, 16, 40), dtype=dtype)
    assert_close_to_reference(x, "cpp", estimator=estimator)
    assert mmdkernels.mmd_loss(x, estimator=estimator).dtype == torch.float32


def test_non_contiguous_input():
    x = make_input((3, 4, 21, 9)).transpose(2, 3)  # a [B, K, T, D] buffer viewed as [B, K, D=9, T=21]
    assert not x.is_contiguous()
    for options in OPTIONS[:3]:
        assert_close_to_reference(x, "cpp", **options)


def test_custom_bandwidths_direct_exp_path():
    """Bandwidths whose coefficients share no small base: every bandwidth gets its own exp."""
    x = make_input((2, 3, 8, 30))
    assert_close_to_reference(x, "cpp", bandwidths=(0.37, math.pi, 13.3))
    assert_close_to_reference(x, "cpp", bandwidths=(3.0,), estimator="dhsic")


@pytest.mark.parametrize("width", [1, 20])
@pytest.mark.parametrize("mode", ["joint", "pairwise"])
def test_shuffle_fixed_chain_agrees_with_the_plan_loops(mode, width, monkeypatch):
    """The default bandwidths run the shuffle's group loop fixed at compile time (csrc/mmd/chain_fixed.h);
    MMDKERNELS_MMD_CHAIN=plan forces the plan-driven chunk loops. N = 700 (diagonal and mirrored tiles of xx and yy,
    the full xy rows); width 1 puts many distances below 1, where the narrow bandwidths weigh. Both against the
    float64 reference by the rule, and against each other to float32 rounding (the same kernel values)."""
    x = make_input((4, 4, width, 175), seed=29)
    results = {}
    for chain in ("plan", "auto"):
        monkeypatch.setenv("MMDKERNELS_MMD_CHAIN", chain)
        results[chain] = run(x, "cpp", mode=mode)
        assert_close_to_reference(x, "cpp", mode=mode)
    (loss_p, grad_p), (loss_f, grad_f) = results["plan"], results["auto"]
    assert abs(loss_p - loss_f) <= 1e-5 * max(abs(loss_p), loss_scale(x, mode=mode))
    assert (grad_p - grad_f).abs().max() <= 1e-4 * grad_p.abs().max()
    assert grad_p.abs().max() > 0


@pytest.mark.parametrize("estimator", ["shuffle", "dhsic"])
@pytest.mark.parametrize("mode", ["joint", "pairwise"])
def test_far_apart_samples_whose_kernels_underflow(estimator, mode):
    """8 codebooks of 1200 features: the joint distance of two samples is ~19,000, so every kernel, even the chain's
    base exp(-0.005 d), underflows to 0 away from (near-)duplicates; per codebook (~2,400) the base survives and the
    narrow bandwidths do not. The sums are then carried by the diagonal and the duplicates: against the reference."""
    x = make_input((2, 8, 1200, 150), seed=21)
    assert_close_to_reference(x, "cpp", estimator=estimator, mode=mode)


def test_no_grad_forward_matches():
    """Without autograd the kernel skips the gradient pass: the loss still obeys the rule (another code path, so
    not bit for bit)."""
    x = make_input((2, 3, 8, 30))
    with torch.no_grad():
        a = mmdkernels.mmd_loss(x, generator=torch.Generator().manual_seed(1), backend="cpp")
    b = mmdkernels.mmd_loss(x.requires_grad_(), generator=torch.Generator().manual_seed(1), backend="cpp")
    loss64, loss32 = (run(x, "reference", dtype, seed=1)[0] for dtype in (torch.float64, torch.float32))
    for loss, name in ((a, "no-grad loss"), (b, "loss with grad")):
        assert_loss_close(loss, loss64, loss32, loss_scale(x, seed=1), name=name)


def test_generator_makes_it_reproducible():
    x = make_input((2, 3, 8, 30))
    a = mmdkernels.mmd_loss(x, generator=torch.Generator().manual_seed(5))
    b = mmdkernels.mmd_loss(x, generator=torch.Generator().manual_seed(5))
    c = mmdkernels.mmd_loss(x, generator=torch.Generator().manual_seed(6))
    assert a.item() == b.item() and a.item() != c.item()


def test_dhsic_is_deterministic_and_is_zero_for_one_codebook():
    x = make_input((2, 3, 8, 30))
    a = mmdkernels.mmd_loss(x, estimator="dhsic")
    b = mmdkernels.mmd_loss(x, estimator="dhsic")
    assert a.item() == b.item() and a.item() > 0
    single = make_input((2, 1, 8, 30))
    one = mmdkernels.mmd_loss(single, estimator="dhsic")
    loss64, loss32 = (run(single, "reference", dtype, estimator="dhsic")[0] for dtype in (torch.float64, torch.float32))
    scale = loss_scale(single, estimator="dhsic")
    assert_rule(loss64, torch.zeros(()), name="float64 dHSIC of one codebook", scale=scale)  # the spec: 0
    assert_loss_close(one, loss64, loss32, scale, name="dHSIC of one codebook")


def test_independent_codebooks_score_lower_than_dependent():
    """The loss measures dependence: shared structure across codebooks must raise it."""
    g = torch.Generator().manual_seed(0)
    independent = torch.randn(8, 4, 8, 64, generator=g)
    dependent = independent[:, :1].expand(-1, 4, -1, -1) + 0.1 * torch.randn(8, 4, 8, 64, generator=g)
    for estimator in ("shuffle", "dhsic"):
        low = mmdkernels.mmd_loss(independent, estimator=estimator, generator=torch.Generator().manual_seed(1))
        high = mmdkernels.mmd_loss(dependent, estimator=estimator, generator=torch.Generator().manual_seed(1))
        assert high > 4 * low.abs()  # shuffle noise at N = 512 is ~0.01; the dependent loss is ~0.07


def test_fallback_warns_once_and_still_works(monkeypatch):
    from mmdkernels import _ext

    monkeypatch.setitem(_ext._errors, "mmdkernels._C", "simulated: not built")
    monkeypatch.delitem(_ext._loaded, "mmdkernels._C", raising=False)
    monkeypatch.setattr(_ext, "_warned", set())
    x = make_input((2, 2, 4, 10))
    with pytest.warns(RuntimeWarning, match="no fused kernel available"):
        mmdkernels.mmd_loss(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mmdkernels.mmd_loss(x)  # second call: no warning
    with pytest.raises(RuntimeError, match="simulated: not built"):
        mmdkernels.mmd_loss(x, backend="cpp")


def test_env_override_selects_backend(monkeypatch):
    x = make_input((2, 2, 4, 10))
    monkeypatch.setenv("MMDKERNELS_BACKEND", "reference")
    a = mmdkernels.mmd_loss(x, generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("MMDKERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="CUDA kernel runs on CUDA tensors"):
        mmdkernels.mmd_loss(x)
    monkeypatch.delenv("MMDKERNELS_BACKEND")
    b = mmdkernels.mmd_loss(x, generator=torch.Generator().manual_seed(1))
    assert a.item() == run(x, "reference", seed=1)[0].item()  # the reference ran: the same code path
    loss64 = run(x, "reference", torch.float64, seed=1)[0]
    assert_loss_close(b, loss64, a, loss_scale(x, seed=1), name="default backend")


def test_float64_runs_reference_exactly():
    x = make_input((2, 3, 4, 12)).double()
    a = mmdkernels.mmd_loss(x, generator=torch.Generator().manual_seed(1))
    b = ref.mmd_loss_ref(x, generator=torch.Generator().manual_seed(1))
    assert a.dtype == torch.float64 and a.item() == b.item()


# --- the spec itself -------------------------------------------------------------------------------------------


def test_reference_gradcheck_float64():
    x = make_input((2, 2, 3, 6)).double().requires_grad_()
    for options in OPTIONS[:4]:
        perms = ref.draw_permutations(x.shape[0] * x.shape[3], 2, torch.Generator().manual_seed(0), x.device)
        assert torch.autograd.gradcheck(lambda t: ref.mmd_loss_ref(t, perms=perms, **options), (x,))


def test_dhsic_equals_shuffle_averaged_over_all_permutations():
    """dHSIC V-statistic = V-statistic MMD^2 between the joint and the product of marginals (all N^K tuples)."""
    num_samples, num_codebooks = 5, 2
    z = ref.standardize(torch.randn(num_samples, num_codebooks, 3, dtype=torch.float64))
    tuples = list(itertools.product(range(num_samples), repeat=num_codebooks))
    y = torch.stack([torch.stack([z[t[k], k] for k in range(num_codebooks)]) for t in tuples])
    x_flat, y_flat = z.reshape(num_samples, -1), y.reshape(len(tuples), -1)
    v_stat = 0.0
    for a in ref.DEFAULT_BANDWIDTHS:
        k = lambda p, q: torch.exp(-(torch.cdist(p, q) ** 2) / (2 * a))  # noqa: E731
        v_stat += k(x_flat, x_flat).mean() + k(y_flat, y_flat).mean() - 2 * k(x_flat, y_flat).mean()
    groups = ref.codebook_groups(num_codebooks, "joint")
    dhsic = ref.dhsic_ref(z, groups, ref.DEFAULT_BANDWIDTHS)
    # two float64 computations of one sum: the float64 floor, relative to its terms (means in [0, 1], weights 1, 1, 2)
    assert_rule(dhsic, v_stat, name="dHSIC vs all permutations", scale=4 * len(ref.DEFAULT_BANDWIDTHS))


def test_delay_alignment_keeps_the_codes_of_one_step():
    x = torch.arange(2 * 3 * 1 * 6, dtype=torch.float32).reshape(2, 3, 1, 6)
    aligned = ref.delay_align(x)
    assert aligned.shape == (2, 3, 1, 3)
    for k in range(3):
        torch.testing.assert_close(aligned[:, k, :, 0], x[:, k, :, 3 - k])
