"""dHSIC on the C++ CPU kernel with each distance-tile kernel forced (MMDKERNELS_MMD_TILE): the GEMM tile (on each GEMM
provider) and the micro-kernel with the distance epilogue fused (csrc/mmd/gram_fused.h), against the float64
reference by the rule. The rest of the MMD suite runs on the automatic choice; to run all of it on one kernel:
MMDKERNELS_MMD_TILE=fused pytest tests/test_mmd.py tests/test_mmd_distributed.py ..."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from mmd_cases import assert_close_to_reference, make_input, run

import mmdkernels
from mmdkernels import _ext

pytestmark = pytest.mark.skipif(not _ext.available("cpu"), reason="the C++ CPU library is not built")

TILE_ENV = "MMDKERNELS_MMD_TILE"


# [B, K, D, T]: N = B T from 1 row to several 256-row blocks with a partial last one; D below, between and at the
# panel widths (8 / 16 lanes, 32-column pairs); K = 3 makes tiles of 341 columns, so tiles start inside a column pair.
SHAPES = [(1, 1, 1, 2), (2, 2, 3, 5), (3, 3, 5, 7), (2, 4, 17, 11), (1, 3, 40, 37), (4, 4, 32, 129),
          (3, 2, 128, 200), (2, 3, 33, 300), (1, 8, 16, 261)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["joint", "pairwise"])
def test_dhsic_matches_reference(shape, mode, each_dhsic_tile):
    if mode == "pairwise" and shape[1] < 2:
        pytest.skip(reason="pairwise mode needs two codebooks")
    x = make_input(shape, seed=shape[3])
    assert_close_to_reference(x, "cpp", estimator="dhsic", mode=mode)


@pytest.mark.parametrize("seed", [2, 7])
def test_dhsic_duplicate_frames_under_delay(seed, each_dhsic_tile):
    """Exact duplicates (d = 0 exactly after the near-duplicate refinement) at D = 128, the width of the fast path."""
    x = make_input((3, 2, 128, 50), seed=seed)
    for mode in ("joint", "pairwise"):
        assert_close_to_reference(x, "cpp", delay=True, estimator="dhsic", mode=mode)


def test_one_codebook_has_exactly_zero_gradient(each_dhsic_tile):
    _, grad = run(make_input((2, 1, 128, 70)), "cpp", estimator="dhsic")
    assert torch.count_nonzero(grad) == 0


def test_non_contiguous_input(each_dhsic_tile):
    x = make_input((3, 4, 21, 9)).transpose(2, 3)
    assert not x.is_contiguous()
    assert_close_to_reference(x, "cpp", estimator="dhsic")


@pytest.mark.parametrize("mode", ["joint", "pairwise"])
def test_tiles_one_per_thread_match_one_thread(mode, each_dhsic_tile):
    """N = 1200 is 5 row blocks: with 2 threads the tiles run one per thread in rounds on disjoint rows (TileSchedule
    in dhsic_cpu.cpp; at K = 3 its 341-column tiles cut the row blocks, so a tile's columns share blocks with others),
    with 1 thread tile by tile. Both against the reference, and against each other to float32 rounding (the sums
    agree bit for bit here; a gradient product may round differently inside a parallel region, ~1e-6 of max |grad|,
    where a lost update of a race would be of the order of the gradient itself)."""
    x = make_input((4, 3, 20, 300), seed=11)
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results[threads] = run(x, "cpp", estimator="dhsic", mode=mode)
            assert_close_to_reference(x, "cpp", estimator="dhsic", mode=mode)
    finally:
        torch.set_num_threads(before)
    (loss_1, grad_1), (loss_2, grad_2) = results[1], results[2]
    assert abs(loss_1 - loss_2) <= 1e-6 * abs(loss_1)
    assert (grad_1 - grad_2).abs().max() <= 1e-5 * grad_1.abs().max()


@pytest.mark.parametrize("threads", [3, 4])
def test_more_threads_than_cores_match_one_thread(threads, each_dhsic_tile):
    """N = 2100 is 9 row blocks (rounds of 9, then 4 tiles): at 3 threads a round's tiles do not divide evenly among
    them, at 4 threads they do (each thread strides through the round); more threads than this machine's cores on
    purpose. Against the 1-thread result (itself checked against the reference above)."""
    x = make_input((3, 3, 20, 700), seed=13)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loss_1, grad_1 = run(x, "cpp", estimator="dhsic", mode="pairwise")
        torch.set_num_threads(threads)
        loss_t, grad_t = run(x, "cpp", estimator="dhsic", mode="pairwise")
    finally:
        torch.set_num_threads(before)
    assert abs(loss_1 - loss_t) <= 1e-6 * abs(loss_1)
    assert (grad_1 - grad_t).abs().max() <= 1e-5 * grad_1.abs().max()


@pytest.mark.parametrize("schedule", ["per-thread", "inside"])
def test_forced_schedule_matches_the_reference(schedule, monkeypatch):
    """MMDKERNELS_DHSIC_SCHEDULE forces one tile per thread even where rounds are smaller than the thread count
    (N = 600: rounds of 3, 1, 1 and 1 tiles, the small ones run with the threads inside), or the threads inside every
    tile."""
    monkeypatch.setenv("MMDKERNELS_DHSIC_SCHEDULE", schedule)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert_close_to_reference(make_input((2, 3, 24, 300), seed=17), "cpp", estimator="dhsic", mode="joint")
    finally:
        torch.set_num_threads(before)


def test_bad_schedule_names_the_variable(monkeypatch):
    monkeypatch.setenv("MMDKERNELS_DHSIC_SCHEDULE", "rounds")
    with pytest.raises(RuntimeError, match="MMDKERNELS_DHSIC_SCHEDULE"):
        mmdkernels.mmd_loss(make_input((2, 2, 8, 30)), estimator="dhsic", backend="cpp")


def test_the_two_kernels_agree(monkeypatch):
    """Both obey the rule (above); here they also agree with each other to float32 rounding of the products (MKL's
    small-K kernel accumulates each dot in the same order as ours, so they may even agree bit for bit)."""
    x = make_input((2, 4, 128, 300), seed=5)
    results = {}
    for kernel in ("gemm", "fused"):
        monkeypatch.setenv(TILE_ENV, kernel)
        results[kernel] = run(x, "cpp", estimator="dhsic")
    (loss_g, grad_g), (loss_f, grad_f) = results["gemm"], results["fused"]
    assert abs(loss_g - loss_f) <= 1e-5 * abs(loss_g)
    assert (grad_g - grad_f).abs().max() <= 1e-4 * grad_g.abs().max()


def _tile_lines(tile_kernel: str) -> list[str]:
    """The dHSIC tile lines a fresh process prints (MMDKERNELS_GEMM_VERBOSE=1) for two calls of one shape class."""
    code = (
        "import torch, mmdkernels; x = torch.randn(2, 4, 128, 300)\n"
        "for _ in range(2): mmdkernels.mmd_loss(x.requires_grad_(), estimator='dhsic', backend='cpp').backward()\n"
    )
    env = dict(os.environ, MMDKERNELS_GEMM_VERBOSE="1", **{TILE_ENV: tile_kernel})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
    return [line for line in out.splitlines() if line.startswith("mmdkernels dhsic tile:")]


@pytest.mark.parametrize("tile_kernel", ["gemm", "fused"])
def test_forcing_selects_the_kernel(tile_kernel):
    assert _tile_lines(tile_kernel) == [f"mmdkernels dhsic tile: -> {tile_kernel} ({TILE_ENV})"]


def test_auto_measures_once_per_shape_class_and_prints_the_choice():
    """The first call of a shape class times both kernels and prints the choice; later passes and calls of the same
    class reuse it."""
    lines = _tile_lines("auto")
    assert len(lines) == 1, lines
    assert lines[0].endswith(("-> gemm", "-> fused")) and "x 128, K 4, N 600" in lines[0], lines[0]


def test_the_choices_are_reported():
    """ops.dhsic_tile_choices: one record per measured shape class, with the kernel, the schedule and both times
    (what the benchmarks record as dhsic_tile_chosen); the op's schema."""
    code = (
        "import json, torch, mmdkernels\nfrom mmdkernels.mmd import ops\ntorch.set_num_threads(2)\n"
        "assert ops.dhsic_tile_choices() == []\nx = torch.randn(2, 4, 128, 600)\n"
        "for _ in range(2): mmdkernels.mmd_loss(x.requires_grad_(), estimator='dhsic', backend='cpp').backward()\n"
        "print(json.dumps(ops.dhsic_tile_choices()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (TILE_ENV, "MMDKERNELS_DHSIC_SCHEDULE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    (choice,) = json.loads(out.splitlines()[-1])
    assert (choice["codebooks"], choice["width"], choice["threads"]) == (4, 128, 2), choice
    assert choice["schedule"] == "per-thread"  # N = 1200: 5 row blocks, rounds of 5 and 2 tiles
    assert choice["chosen"] in ("gemm", "fused") and set(choice["seconds"]) == {"gemm", "fused"}
    best = min(choice["seconds"], key=choice["seconds"].get)
    assert choice["chosen"] == best
    torch.library.opcheck(torch.ops.mmdkernels.mmd_dhsic_tile_choices.default, (), test_utils=("test_schema",))


def test_bad_tile_kernel_names_the_variable(monkeypatch):
    monkeypatch.setenv(TILE_ENV, "blas")
    with pytest.raises(RuntimeError, match=TILE_ENV):
        mmdkernels.mmd_loss(make_input((2, 2, 8, 30)), estimator="dhsic", backend="cpp")


@pytest.mark.parametrize("width", [1, 20])
@pytest.mark.parametrize("mode", ["joint", "pairwise"])
def test_fixed_chain_loops_agree_with_the_plan_loops(mode, width, monkeypatch):
    """The default bandwidths run the passes' fused loops (csrc/mmd/chain_fixed.h); MMDKERNELS_MMD_CHAIN=plan forces
    the plan-driven chunk loops on the same input. N = 700 gives diagonal and mirrored tiles (column sums) and a
    partial last block; with one feature per codebook many distances are below 1, where the narrow bandwidths (0.1,
    1) weigh as much as the wide ones (at width 20 only the wide ones reach past the diagonal). Both against the
    float64 reference by the rule, and against each other: the kernel values are the same multiplications, only sums
    round differently (~1e-7 relative)."""
    x = make_input((4, 4, width, 175), seed=19)
    results = {}
    for chain in ("plan", "auto"):
        monkeypatch.setenv("MMDKERNELS_MMD_CHAIN", chain)
        results[chain] = run(x, "cpp", estimator="dhsic", mode=mode)
        assert_close_to_reference(x, "cpp", estimator="dhsic", mode=mode)
    (loss_p, grad_p), (loss_f, grad_f) = results["plan"], results["auto"]
    assert abs(loss_p - loss_f) <= 1e-5 * abs(loss_p)
    assert (grad_p - grad_f).abs().max() <= 1e-4 * grad_p.abs().max()
    assert not torch.equal(grad_p, torch.zeros_like(grad_p))


def test_scaled_default_chain_takes_the_fixed_loops():
    """Bandwidths twice the default have the same chain with another base (0.0025): the fixed loops take it, with the
    base coefficient passed through; against the reference."""
    from mmdkernels.mmd import reference as ref

    bandwidths = tuple(2 * a for a in ref.DEFAULT_BANDWIDTHS)
    assert_close_to_reference(make_input((3, 3, 16, 150), seed=23), "cpp", estimator="dhsic", bandwidths=bandwidths)


def test_bad_chain_names_the_variable(monkeypatch):
    monkeypatch.setenv("MMDKERNELS_MMD_CHAIN", "fixed")
    with pytest.raises(RuntimeError, match="MMDKERNELS_MMD_CHAIN"):
        mmdkernels.mmd_loss(make_input((2, 2, 8, 30)), estimator="dhsic", backend="cpp")
