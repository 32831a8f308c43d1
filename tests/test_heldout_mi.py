"""heldout_mutual_information: ~0 on independent codes where count estimates are biased, converging to the
closed-form MI of synthetic dependent codes as the training set grows, intervals that cover, smoothing never fitted
on the test codes."""

import math

import pytest
import torch

from mmdkernels import metrics

C = 64


def copy_codes(rows: int, frames: int, p: float, seed: int, num_entries: int = C) -> torch.Tensor:
    """[rows, 3, frames]: c0 uniform; c1 = c0 with probability p, else uniform; c2 uniform and independent."""
    generator = torch.Generator().manual_seed(seed)
    c0 = torch.randint(0, num_entries, (rows, frames), generator=generator)
    keep = torch.rand(rows, frames, generator=generator) < p
    c1 = torch.where(keep, c0, torch.randint(0, num_entries, (rows, frames), generator=generator))
    c2 = torch.randint(0, num_entries, (rows, frames), generator=generator)
    return torch.stack([c0, c1, c2], 1)


def copy_mi(p: float, num_entries: int = C) -> float:
    """I(c0; c1) in nats for the copy channel above: p(b | a) = p [a = b] + (1 - p) / C, uniform marginals."""
    same = p + (1 - p) / num_entries
    return same * math.log(num_entries * same) + (num_entries - 1) * (1 - p) / num_entries * math.log(1 - p)


def estimate(train, test, seed=0, **kwargs):
    return metrics.heldout_mutual_information(
        train, test, num_entries=C, generator=torch.Generator().manual_seed(seed), **kwargs
    )


def test_independent_codes_give_zero_where_counts_are_biased():
    # 6,000 samples of C = 64 independent uniform codes: the Miller-Madow count estimate is still biased upwards
    train, test = copy_codes(12, 500, 0.0, seed=1), copy_codes(12, 500, 0.0, seed=2)
    result = estimate(train, test)
    off_diagonal = ~torch.eye(3, dtype=torch.bool)
    assert result.estimate.shape == (3, 3) and result.estimate.dtype == torch.float64
    assert result.estimate[off_diagonal].abs().max() < 0.01  # no positive bias
    assert (result.low[off_diagonal] <= 0.01).all()
    counted = metrics.pairwise_mutual_information(test, C)
    assert counted[off_diagonal].min() > 0.05  # the bias the held-out estimate avoids
    # the diagonal: held-out cross-entropy of each marginal, >= log C - (sampling noise) for uniform codes
    assert torch.allclose(result.estimate.diagonal(), torch.full((3,), math.log(C), dtype=torch.float64), atol=0.01)


def test_dependent_codes_approach_the_closed_form_mi_as_training_grows():
    p = 0.5
    truth = copy_mi(p)
    test = copy_codes(16, 500, p, seed=100)
    errors = []
    for rows in (2, 8, 64):
        result = estimate(copy_codes(rows, 500, p, seed=rows), test)
        errors.append(truth - float(result.estimate[0, 1]))
        assert result.low[0, 1] <= result.estimate[0, 1] <= result.high[0, 1]
        assert abs(result.estimate[0, 2]) < 0.02 and abs(result.estimate[1, 2]) < 0.02
    assert errors[0] > errors[1] > errors[2] > -0.05, errors  # from below, monotonically
    assert abs(errors[-1]) < 0.1
    # at the largest training set the test set's own sampling spread dominates: the interval covers the truth
    assert result.low[0, 1] - 0.03 <= truth <= result.high[0, 1] + 0.03
    assert result.estimate[1, 0] == pytest.approx(float(result.estimate[0, 1]), abs=0.05)  # symmetric channel


def test_interval_shrinks_with_more_test_pieces_and_is_reproducible():
    train = copy_codes(32, 500, 0.3, seed=0)
    small = estimate(train, copy_codes(4, 500, 0.3, seed=5))
    large = estimate(train, copy_codes(32, 500, 0.3, seed=6))
    assert (large.high - large.low)[0, 1] < (small.high - small.low)[0, 1]
    again = estimate(train, copy_codes(4, 500, 0.3, seed=5))
    assert torch.equal(again.low, small.low) and torch.equal(again.estimate, small.estimate)
    low, mean, high = small.mean_offdiagonal[1], small.mean_offdiagonal[0], small.mean_offdiagonal[2]
    assert low <= mean <= high
    record = small.to_dict()
    assert record["conditional_smoothing"][0][0] == "inf" and len(record["estimate"]) == 3


def test_smoothing_never_sees_the_test_codes():
    train = copy_codes(8, 300, 0.5, seed=0)
    a = estimate(train, copy_codes(4, 300, 0.5, seed=1))
    b = estimate(train, copy_codes(4, 300, 0.0, seed=2))  # other test codes: same smoothing
    assert torch.equal(a.conditional_smoothing, b.conditional_smoothing)
    assert torch.equal(a.marginal_smoothing, b.marginal_smoothing)


def test_delay_alignment_finds_a_dependence_across_frames():
    codes = copy_codes(8, 400, 0.0, seed=3)
    codes[:, 1, :-1] = codes[:, 0, 1:]  # c1 at frame t copies c0 at t + 1: one delay step holds both
    test = codes[:4]
    plain = estimate(codes[4:], test)
    aligned = estimate(codes[4:], test, delay=True)
    assert abs(float(plain.estimate[0, 1])) < 0.05
    assert float(aligned.estimate[0, 1]) > math.log(C) - 0.2


def test_a_single_training_row_splits_its_frames():
    result = estimate(copy_codes(1, 2000, 0.5, seed=0), copy_codes(2, 500, 0.5, seed=1))
    assert 0.5 < float(result.estimate[0, 1]) < copy_mi(0.5)


def test_bad_arguments():
    codes = copy_codes(2, 20, 0.0, seed=0)
    with pytest.raises(ValueError, match="same K"):
        estimate(codes, codes[:, :2])
    with pytest.raises(TypeError, match="test_codes"):
        estimate(codes, codes.float())
    with pytest.raises(ValueError, match="confidence"):
        estimate(codes, codes, confidence=1.5)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        estimate(codes, codes + C)
