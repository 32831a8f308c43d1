"""Codebook-dependence metrics: known answers, a plain-Python brute force, bias correction, delay alignment, errors."""

import json
import math
from collections import Counter
from statistics import fmean

import pytest
import torch

from mmdkernels import metrics
from mmdkernels.mmd.reference import delay_align

C = 16
LOG_C = math.log(C)
# Independent uniform codes, N = 200k, C = 16: the plug-in MI bias is (C-1)^2 / (2N) = 5.6e-4 and the standard
# deviation of the Miller-Madow MI is sqrt(2 (C-1)^2) / (2N) = 5.3e-5, so 3e-4 is > 5 sigma and well under the bias.
MI_TOL = 3e-4
# Total correlation over C^3 = 4096 tuples (~49 samples each): plug-in bias ~1e-2, corrected sd ~2e-4.
TC_TOL = 2e-3


def uniform_codes(shape, num_entries=C, seed=0):
    return torch.randint(0, num_entries, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def independent():
    return uniform_codes((4, 3, 50_000))


def test_independent_codes_have_zero_mi_and_total_correlation(independent):
    mi = metrics.pairwise_mutual_information(independent, C)
    assert mi.shape == (3, 3) and mi.dtype == torch.float64
    off_diagonal = mi[~torch.eye(3, dtype=torch.bool)]
    assert off_diagonal.abs().max() < MI_TOL
    assert torch.allclose(mi.diagonal(), torch.full((3,), LOG_C, dtype=torch.float64), atol=1e-3)
    assert torch.equal(mi, mi.T)
    assert abs(metrics.total_correlation(independent, C)) < TC_TOL
    plug_in = metrics.pairwise_mutual_information(independent, C, bias_correction="none")
    assert plug_in[0, 1] > MI_TOL  # the bias the correction removes is visible at this N


def test_dependent_codes_have_mi_equal_to_entropy(independent):
    codes = independent.clone()
    codes[:, 1] = (7 * codes[:, 0] + 3) % C  # a bijection of codebook 0
    codes[:, 2] = codes[:, 0]
    mi = metrics.pairwise_mutual_information(codes, C)
    assert torch.allclose(mi, torch.full((3, 3), LOG_C, dtype=torch.float64), atol=1e-3)
    nmi = metrics.normalized_mutual_information(codes, C)
    assert torch.allclose(nmi, torch.ones(3, 3, dtype=torch.float64), atol=1e-12)
    # the three codebooks determine each other: 3 H(c_0) - H(c_0, c_1, c_2) = 2 log C
    assert metrics.total_correlation(codes, C) == pytest.approx(2 * LOG_C, abs=1e-3)


def test_tiny_example_matches_hand_computation():
    # c0 = 0 0 1 1, c1 = 0 1 1 1: joint counts (0,0) 1, (0,1) 1, (1,1) 2 over N = 4
    codes = torch.tensor([[[0, 0, 1, 1], [0, 1, 1, 1]]])
    h0 = math.log(2)
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    h01 = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    mi = metrics.pairwise_mutual_information(codes, bias_correction="none")
    expected = torch.tensor([[h0, h0 + h1 - h01], [h0 + h1 - h01, h1]], dtype=torch.float64)
    assert torch.allclose(mi, expected, rtol=0, atol=1e-12)
    assert metrics.total_correlation(codes, bias_correction="none") == pytest.approx(h0 + h1 - h01, abs=1e-12)
    nmi = metrics.normalized_mutual_information(codes, bias_correction="none")
    assert nmi[0, 1].item() == pytest.approx((h0 + h1 - h01) / math.sqrt(h0 * h1), abs=1e-12)
    # Miller-Madow with N = 4: +1/8 for each marginal (2 bins), +2/8 for the joint (3 bins)
    corrected = metrics.pairwise_mutual_information(codes)
    assert corrected[0, 0].item() == pytest.approx(h0 + 1 / 8, abs=1e-12)
    assert corrected[0, 1].item() == pytest.approx(h0 + h1 - h01, abs=1e-12)


def test_miller_madow_reduces_small_sample_bias():
    plug_in, corrected, tc_plug_in, tc_corrected = [], [], [], []
    for seed in range(20):
        codes = uniform_codes((1, 3, 200), num_entries=8, seed=seed)
        plug_in.append(metrics.pairwise_mutual_information(codes, 8, bias_correction="none")[0, 1].item())
        corrected.append(metrics.pairwise_mutual_information(codes, 8)[0, 1].item())
        tc_plug_in.append(metrics.total_correlation(codes, 8, bias_correction="none"))
        tc_corrected.append(metrics.total_correlation(codes, 8))
    assert abs(fmean(corrected)) < 0.3 * fmean(plug_in)  # true MI is 0: plug-in ~0.14 nats, corrected ~0.02
    assert abs(fmean(tc_corrected)) < fmean(tc_plug_in)


def test_delay_align_codes_matches_reference():
    codes = uniform_codes((2, 4, 11))
    expected = delay_align(codes[:, :, None, :].double())[:, :, 0, :].long()
    aligned = metrics.delay_align_codes(codes)
    assert aligned.shape == (2, 4, 7)
    assert torch.equal(aligned, expected)


def test_delayed_dependence_is_seen_only_after_alignment():
    """Codebook k at frame t = codebook 0 at frame t + k: the codes one delay-pattern step predicts together."""
    batch, num_codebooks, num_frames = 4, 3, 20_000
    base = uniform_codes((batch, num_frames + num_codebooks))
    codes = torch.stack([base[:, k : k + num_frames] for k in range(num_codebooks)], dim=1)
    aligned = metrics.pairwise_mutual_information(codes, C, delay=True)
    assert torch.allclose(aligned, torch.full((3, 3), LOG_C, dtype=torch.float64), atol=1e-3)
    assert metrics.normalized_mutual_information(codes, C, delay=True).min() > 1 - 1e-12
    unaligned = metrics.pairwise_mutual_information(codes, C)
    assert unaligned[~torch.eye(3, dtype=torch.bool)].abs().max() < 1e-3
    # the opposite shift (codebook k at frame t = codebook 0 at frame t - k) is moved further apart by the alignment
    reversed_codes = torch.stack([base[:, num_codebooks - k : num_codebooks - k + num_frames] for k in range(3)], 1)
    misaligned = metrics.pairwise_mutual_information(reversed_codes, C, delay=True)
    assert misaligned[~torch.eye(3, dtype=torch.bool)].abs().max() < 1e-3


def brute_entropy(values, correction):
    counts = Counter(values)
    n = len(values)
    entropy = -sum(c / n * math.log(c / n) for c in counts.values())
    return entropy + ((len(counts) - 1) / (2 * n) if correction == "miller_madow" else 0.0)


def brute_samples(codes, delay):
    batch, num_codebooks, num_frames = codes.shape
    rows = codes.tolist()
    if not delay:
        return [tuple(rows[b][k][t] for k in range(num_codebooks)) for b in range(batch) for t in range(num_frames)]
    return [
        tuple(rows[b][k][t + num_codebooks - k] for k in range(num_codebooks))
        for b in range(batch)
        for t in range(num_frames - num_codebooks)
    ]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("delay", [False, True])
@pytest.mark.parametrize("correction", ["miller_madow", "none"])
def test_matches_plain_python_brute_force(seed, delay, correction):
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(int(torch.randint(lo, hi, (), generator=generator)) for lo, hi in ((1, 4), (1, 5), (6, 30)))
    num_entries = int(torch.randint(2, 6, (), generator=generator))
    codes = torch.randint(0, num_entries, shape, generator=generator)
    samples = brute_samples(codes, delay)
    num_codebooks = shape[1]
    marginals = [brute_entropy([s[k] for s in samples], correction) for k in range(num_codebooks)]
    expected = [[marginals[i]] * num_codebooks for i in range(num_codebooks)]
    for i in range(num_codebooks):
        for j in range(num_codebooks):
            if i != j:
                joint = brute_entropy([(s[i], s[j]) for s in samples], correction)
                expected[i][j] = marginals[i] + marginals[j] - joint
    mi = metrics.pairwise_mutual_information(codes, num_entries, delay=delay, bias_correction=correction)
    assert torch.allclose(mi, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    tc = sum(marginals) - brute_entropy(samples, correction) if num_codebooks > 1 else 0.0
    total = metrics.total_correlation(codes, num_entries, delay=delay, bias_correction=correction)
    assert total == pytest.approx(tc, abs=1e-12)


def test_dependence_report_is_json_friendly():
    codes = uniform_codes((2, 3, 40), num_entries=4)
    report = metrics.dependence_report(codes, 4, delay=True)
    json.loads(json.dumps(report, allow_nan=False))
    assert report["num_samples"] == 2 * 37 and report["num_codebooks"] == 3 and report["num_entries"] == 4
    mi = metrics.pairwise_mutual_information(codes, 4, delay=True)
    assert report["mutual_information"] == mi.tolist()
    assert report["mean_offdiag_mutual_information"] == pytest.approx((mi.sum() - mi.trace()).item() / 6, abs=1e-15)
    assert report["total_correlation"] == metrics.total_correlation(codes, 4, delay=True)
    single = metrics.dependence_report(codes[:, :1])
    assert single["mean_offdiag_mutual_information"] is None and single["total_correlation"] == 0.0


def test_large_codebook_counts_sparsely():
    """C^2 beyond the dense bincount table: counts come from torch.unique, empty bins change nothing."""
    codes = uniform_codes((2, 3, 300), num_entries=50)
    sparse = metrics.pairwise_mutual_information(codes, 5000)
    assert torch.allclose(sparse, metrics.pairwise_mutual_information(codes), rtol=0, atol=1e-12)


def test_constant_codebook_has_zero_nmi():
    codes = uniform_codes((1, 2, 50), num_entries=4)
    codes[:, 1] = 2
    nmi = metrics.normalized_mutual_information(codes, 4)
    assert nmi[1].abs().max() == 0 and nmi[:, 1].abs().max() == 0 and nmi[0, 0] == 1


GOOD = torch.zeros(2, 3, 10, dtype=torch.int64)


@pytest.mark.parametrize(
    "codes, kwargs, error, match",
    [
        ([[[0, 1]]], {}, TypeError, "codes must be a torch.Tensor"),
        (GOOD.float(), {}, TypeError, "codes must be an integer tensor"),
        (GOOD.bool(), {}, TypeError, "codes must be an integer tensor"),
        (GOOD[0], {}, ValueError, r"codes must have shape \[B, K, T\]"),
        (GOOD[None], {}, ValueError, r"codes must have shape \[B, K, T\]"),
        (GOOD[:, :0], {}, ValueError, "K >= 1"),
        (GOOD[:1, :, :1], {}, ValueError, "at least 2 samples"),
        (GOOD[:, :, :3], {"delay": True}, ValueError, "T > K"),
        (GOOD[:1, :, :4], {"delay": True}, ValueError, "at least 2 samples"),
        (GOOD - 1, {}, ValueError, r"values in \[0, "),
        (GOOD + 5, {"num_entries": 5}, ValueError, r"values in \[0, 5\)"),
        (GOOD, {"num_entries": 0}, ValueError, "num_entries must be >= 1"),
        (GOOD, {"num_entries": 4.0}, TypeError, "num_entries must be an int"),
        (GOOD, {"bias_correction": "jackknife"}, ValueError, "bias_correction must be one of"),
    ],
)
def test_bad_arguments_raise(codes, kwargs, error, match):
    with pytest.raises(error, match=match):
        metrics.pairwise_mutual_information(codes, **kwargs)


def test_every_entry_point_validates():
    for function in (metrics.normalized_mutual_information, metrics.total_correlation, metrics.dependence_report):
        with pytest.raises(ValueError, match="T > K"):
            function(GOOD[:, :, :3], delay=True)
    with pytest.raises(ValueError, match="T > K"):
        metrics.delay_align_codes(GOOD[:, :, :3])
    with pytest.raises(TypeError, match="integer tensor"):
        metrics.delay_align_codes(GOOD.float())
