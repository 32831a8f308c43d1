"""int8 weights on AMX-INT8 tiles (csrc/linear/linear_amx_int8.h): x written as four signed 8-bit digits on a
fixed-point grid of its row (v = round(x 2^s), |v| < 2^30), the weights multiplied as stored in int32, then
y = float32(float32(2^-s sum_k v_k q_nk) * scale_n). Where the CPU runs them (mmdkernels.linear.ops.tile_paths()
lists "int8") the result is checked bit for bit against that formula in float64 (exact: the integer sums stay below
2^53), so the test fails if the path does not run or rounds otherwise; on every CPU, with and without the tiles
(MMDKERNELS_LINEAR_AMX=0: the FMA kernel), the rule of tests/tolerances.py against decode_linear_ref in float64."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import assert_close_to_reference

from mmdkernels import _ext
from mmdkernels.linear import MAX_ROWS, decode_linear, decode_linear_ref, pack_decode_weight
from mmdkernels.linear.ops import tile_paths

needs_cpp = pytest.mark.skipif(not _ext.available("cpu"), reason="the C++ extension is not built")


def _int8_tiles_run() -> bool:
    return _ext.available("cpu") and "int8" in tile_paths()


def _digits_formula(x: torch.Tensor, packed) -> torch.Tensor:
    """What the tiles compute for D a multiple of 64 (no float32 tail), in float64 then float32 as the kernel does."""
    largest = x.abs().amax(1).double()
    shift = torch.tensor([30 - math.frexp(float(m))[1] for m in largest], dtype=torch.float64)
    v = torch.round(x.double() * torch.exp2(shift)[:, None])  # half to even, as the kernel's conversion
    assert bool((v.abs() <= 2**30).all())
    total = v @ packed.data.double().t()  # integers below 2^53: exact
    return (total * torch.exp2(-shift)[:, None]).float() * packed.scale


@pytest.fixture(params=["tiles", "fma"])
def path(request, monkeypatch):
    """Both int8 paths of the C++ kernel: AMX-INT8 tiles where the CPU has them, and the FMA kernel."""
    monkeypatch.setenv("MMDKERNELS_LINEAR_AMX", "1" if request.param == "tiles" else "0")
    return request.param


@needs_cpp
def test_tile_paths_follow_the_switch(monkeypatch):
    monkeypatch.setenv("MMDKERNELS_LINEAR_AMX", "0")
    assert tile_paths() == []
    monkeypatch.setenv("MMDKERNELS_LINEAR_AMX", "1")
    paths = tile_paths()
    assert set(paths) <= {"bf16", "int8"} and ("int8" not in paths or "bf16" in paths)
    if _ext.cpu_capability() != "avx512":
        assert paths == []


@needs_cpp
@pytest.mark.skipif(not _int8_tiles_run(), reason="this CPU has no AMX-INT8 tiles")
@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 1))
def test_tiles_compute_the_digit_formula_bit_for_bit(rows, monkeypatch):
    """Every row count (1-16: one to four groups of four rows, 13-16 in two passes over each weight tile), two
    weight tiles plus leftover outputs (the FMA kernel's), rows of very different ranges, 1 and 2 threads."""
    monkeypatch.setenv("MMDKERNELS_LINEAR_AMX", "1")
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 192, generator=g) * torch.exp2(torch.randint(-20, 21, (rows, 1), generator=g).float())
    packed = pack_decode_weight(torch.randn(37, 192, generator=g), "int8")
    expected = _digits_formula(x, packed)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = decode_linear(x, packed, backend="cpp")
            assert torch.equal(y[:, :32], expected[:, :32]), f"{n} threads"
            assert_close_to_reference(
                y, decode_linear_ref(x.double(), packed), decode_linear_ref(x, packed), name=f"{rows} rows"
            )
    finally:
        torch.set_num_threads(threads)


@needs_cpp
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 12, 13, 16])
@pytest.mark.parametrize("dim,out", [(64, 16), (100, 45), (1003, 33), (512, 300)])
def test_both_paths_match_float64(path, rows, dim, out):
    """D of one step, steps plus a float32 tail, out_features of one tile, tiles plus leftovers."""
    g = torch.Generator().manual_seed(rows * 7 + dim + out)
    x = torch.randn(rows, dim, generator=g)
    packed = pack_decode_weight(torch.randn(out, dim, generator=g), "int8")
    bias = torch.randn(out, generator=g)
    for activation in (None, "gelu"):
        y = decode_linear(x, packed, bias, activation=activation, backend="cpp")
        ref64 = decode_linear_ref(x.double(), packed, bias.double(), activation=activation)
        baseline = decode_linear_ref(x, packed, bias, activation=activation)
        assert_close_to_reference(y, ref64, baseline, name=f"int8 {path}, {rows} rows, activation {activation}")


@needs_cpp
def test_error_bound_on_rows_of_wide_range(path):
    """Elements from 2^-30 to 2^30 within each row: the grid keeps 30 bits below the row's largest element, so the
    tiles' error is at most 2^-30 max|x_row| sum|q_n| scale_n plus two float32 roundings of the output; the rule
    holds on both paths."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 256, generator=g) * torch.exp2(torch.randint(-30, 31, (6, 256), generator=g).float())
    packed = pack_decode_weight(torch.randn(48, 256, generator=g), "int8")
    y = decode_linear(x, packed, backend="cpp").double()
    ref64 = decode_linear_ref(x.double(), packed)
    assert_close_to_reference(y.float(), ref64, decode_linear_ref(x, packed), name=f"int8 {path}, wide rows")
    if path == "tiles" and _int8_tiles_run():
        grid = 2.0**-30 * x.double().abs().amax(1)[:, None] * packed.data.double().abs().sum(1)
        bound = grid * packed.scale.double() + 2 * 2.0**-24 * ref64.abs() + 1e-300
        assert bool(((y - ref64).abs() <= bound).all())


@needs_cpp
def test_zero_tiny_and_huge_rows(path):
    """A row of zeros gives zeros; rows near the ends of float32's range are scaled in double, not overflowed."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 128, generator=g)
    x[0] = 0
    x[1] *= 1e-30
    x[2] *= 1e30
    packed = pack_decode_weight(torch.randn(32, 128, generator=g), "int8")
    y = decode_linear(x, packed, backend="cpp")
    assert torch.equal(y[0], torch.zeros(32)) and bool(torch.isfinite(y).all())
    ref64, baseline = decode_linear_ref(x.double(), packed), decode_linear_ref(x, packed)
    assert_close_to_reference(y, ref64, baseline, name=f"int8 {path}, zero / tiny / huge rows")


@needs_cpp
def test_inf_and_nan_rows_propagate_as_on_the_fma_path(monkeypatch):
    """A call whose x holds inf or NaN is not written as digits: it runs the FMA kernel, which propagates them as
    float32 arithmetic does (the whole call, so that every row rounds one way)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 256, generator=g)
    x[1, 7] = float("nan")
    x[3, 100] = float("inf")
    packed = pack_decode_weight(torch.randn(32, 256, generator=g), "int8")
    results = {}
    for amx in ("1", "0"):
        monkeypatch.setenv("MMDKERNELS_LINEAR_AMX", amx)
        results[amx] = decode_linear(x, packed, backend="cpp")
    torch.testing.assert_close(results["1"], results["0"], rtol=0, atol=0, equal_nan=True)
    assert bool(results["1"][1].isnan().all()) and not bool(results["1"][3].isfinite().any())
    assert bool(torch.isfinite(results["1"][[0, 2, 4]]).all())
