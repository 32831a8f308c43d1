"""Codebook patterns: exact round trips, special tokens where the pattern leaves positions empty, bad input."""

import pytest
import torch

from mmdkernels.patterns import (
    PATTERNS,
    apply_pattern,
    codebook_of_step,
    frames_done,
    num_steps,
    num_streams,
    revert_frames,
    revert_pattern,
    valid_mask,
)

SHAPES = [(1, 1, 1), (2, 1, 7), (3, 4, 1), (2, 4, 13), (1, 5, 2), (2, 3, 50)]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(pattern, shape, seeded):
    batch, num_codebooks, num_frames = shape
    codes = torch.randint(0, 11, shape, generator=seeded)
    sequence = apply_pattern(codes, pattern, special=11)
    assert sequence.shape == (batch, num_streams(pattern, num_codebooks), num_steps(pattern, num_codebooks, num_frames))
    assert torch.equal(revert_pattern(sequence, pattern, num_codebooks, num_frames), codes)
    mask = valid_mask(pattern, num_codebooks, num_frames)
    assert int(mask.sum()) == num_codebooks * num_frames
    assert bool((sequence[:, ~mask] == 11).all()) and bool((sequence[:, mask] < 11).all())


@pytest.mark.parametrize("pattern", PATTERNS)
def test_round_trip_non_contiguous_and_int32(pattern, seeded):
    codes = torch.randint(0, 100, (3, 9, 4), generator=seeded, dtype=torch.int32).transpose(1, 2)
    assert not codes.is_contiguous()
    sequence = apply_pattern(codes, pattern, special=100)
    assert sequence.dtype == torch.int32
    assert torch.equal(revert_pattern(sequence, pattern, 4, 9), codes)


def test_delay_layout_by_hand():
    codes = torch.tensor([[[1, 2, 3], [4, 5, 6], [7, 8, 9]]])
    expected = torch.tensor([[[1, 2, 3, 0, 0], [0, 4, 5, 6, 0], [0, 0, 7, 8, 9]]])
    assert torch.equal(apply_pattern(codes, "delay", special=0), expected)


def test_flatten_and_parallel_layout_by_hand():
    codes = torch.tensor([[[1, 2, 3], [4, 5, 6]]])
    assert torch.equal(apply_pattern(codes, "flatten", special=0), torch.tensor([[[1, 4, 2, 5, 3, 6]]]))
    assert torch.equal(apply_pattern(codes, "parallel", special=0), codes)
    assert torch.equal(codebook_of_step("flatten", 2, 3), torch.tensor([[0, 1, 0, 1, 0, 1]]))
    assert torch.equal(codebook_of_step("delay", 2, 3), torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))


def test_revert_ignores_special_and_trailing_positions(seeded):
    codes = torch.randint(0, 5, (2, 3, 6), generator=seeded)
    sequence = apply_pattern(codes, "delay", special=5)
    mask = valid_mask("delay", 3, 6)
    garbage = sequence.masked_fill(~mask, -7)
    longer = torch.cat([garbage, torch.full((2, 3, 4), -9)], dim=2)
    assert torch.equal(revert_pattern(longer, "delay", 3, 6), codes)


def test_revert_carries_float_values():
    values = torch.randn(2, 1, 12)
    out = revert_pattern(values, "flatten", 3, 4)
    assert out.dtype == values.dtype
    assert torch.equal(out[:, 1, 2], values[:, 0, 2 * 3 + 1])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_revert_frames_reads_only_the_range(pattern, seeded):
    """Each frame range of a sequence equals the slice of the whole revert; positions of other frames may hold
    anything (streaming reads a partly decoded sequence)."""
    codes = torch.randint(0, 50, (2, 3, 6), generator=seeded)
    sequence = apply_pattern(codes, pattern, special=99)
    for first in range(7):
        for last in range(first, 7):
            partial = sequence.clone()
            index = torch.arange(partial.shape[2])
            steps_needed = {"delay": last + 2, "flatten": last * 3, "parallel": last}[pattern]
            partial[:, :, index >= steps_needed] = -1  # not decoded yet
            got = revert_frames(partial, pattern, 3, 6, first, last)
            assert torch.equal(got, codes[:, :, first:last]), (first, last)
    with pytest.raises(ValueError, match="first, last"):
        revert_frames(sequence, pattern, 3, 6, 4, 2)


@pytest.mark.parametrize(
    "pattern, num_codebooks, steps_frames",
    [
        ("delay", 4, [(0, 0), (3, 0), (4, 1), (5, 2), (13, 10), (99, 10)]),
        ("flatten", 4, [(0, 0), (3, 0), (4, 1), (7, 1), (8, 2), (40, 10)]),
        ("parallel", 4, [(0, 0), (1, 1), (10, 10)]),
        ("delay", 1, [(0, 0), (1, 1), (10, 10)]),
    ],
)
def test_frames_done(pattern, num_codebooks, steps_frames):
    for steps, frames in steps_frames:
        assert frames_done(pattern, num_codebooks, 10, steps) == frames
    assert frames_done(pattern, num_codebooks, 10, num_steps(pattern, num_codebooks, 10)) == 10


@pytest.mark.parametrize("pattern", PATTERNS)
def test_frames_done_agrees_with_the_layout(pattern):
    codes = torch.arange(15).reshape(1, 3, 5)  # every code distinct: find where each one is decoded
    sequence = apply_pattern(codes, pattern, special=-1)
    for steps in range(sequence.shape[2] + 1):
        seen = set(sequence[:, :, :steps].flatten().tolist())
        done = 0
        while done < 5 and all(int(c) in seen for c in codes[0, :, done]):
            done += 1
        assert frames_done(pattern, 3, 5, steps) == done


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: apply_pattern(torch.zeros(2, 3, dtype=torch.long), "delay", 0), ValueError, r"\[B, K, T\]"),
        (lambda: apply_pattern(torch.zeros(2, 0, 3, dtype=torch.long), "delay", 0), ValueError, "K, T >= 1"),
        (lambda: apply_pattern(torch.zeros(1, 2, 3), "delay", 0), TypeError, "integer tensor"),
        (lambda: apply_pattern([[[1]]], "delay", 0), TypeError, "torch.Tensor"),
        (lambda: apply_pattern(torch.zeros(1, 2, 3, dtype=torch.long), "zigzag", 0), ValueError, "pattern must be"),
        (lambda: apply_pattern(torch.zeros(1, 2, 3, dtype=torch.long), "delay", 1.5), TypeError, "special"),
        (lambda: revert_pattern(torch.zeros(1, 2, 3), "delay", 2, 3), ValueError, r"\[B, 2, S >= 4\]"),
        (lambda: revert_pattern(torch.zeros(1, 2, 6), "flatten", 2, 3), ValueError, r"\[B, 1, S >= 6\]"),
        (lambda: revert_pattern(torch.zeros(1, 2, 6), "delay", 0, 3), ValueError, "num_codebooks"),
        (lambda: num_steps("delay", 2, 0), ValueError, "num_frames"),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()
