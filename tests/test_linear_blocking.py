"""The few-row C++ linear kernel's weight-row blocking (csrc/linear/blocking.h): every blocking against the float64
spec and bit for bit against each other, the measured choice that never changes a bit, its report and its override."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_to_reference

from mmdkernels import _ext
from mmdkernels.linear import pack_decode_weight
from mmdkernels.linear.ops import blocking_choices, small_batch_linear_op, small_batch_linear_quantized_op

pytestmark = pytest.mark.skipif(not _ext.available("cpu"), reason="the C++ extension is not built")
ENV = "MMDKERNELS_LINEAR_BLOCKING"
PRECISIONS = ("fp32", "bf16", "int8")
BLOCKINGS = ("wide", "spread", "single", "segments")


@pytest.fixture(autouse=True)
def fma_kernel(monkeypatch):
    """The blockings are the FMA kernel's: AMX tiles off (int8 weights take them at every row count where the CPU
    has AMX-INT8, csrc/linear/linear_amx_int8.h)."""
    monkeypatch.setenv("MMDKERNELS_LINEAR_AMX", "0")


def _run(x, weight, bias, gelu):
    """The C++ op for a float32 weight or a packed bfloat16 / int8 one (QuantizedLinearWeight)."""
    if isinstance(weight, torch.Tensor):
        return small_batch_linear_op()(x, weight, bias, gelu)
    return small_batch_linear_quantized_op()(x, weight.data, weight.scale, bias, gelu)


def _dequantized(weight, dtype):
    return weight.to(dtype) if isinstance(weight, torch.Tensor) else weight.dequantize(dtype)


def _problem(precision, rows, dim, out, seed):
    """x [rows, dim], the weight [out, dim] packed in `precision` (a float32 tensor for fp32), bias [out]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g)
    weight = torch.randn(out, dim, generator=g) / dim**0.5
    bias = torch.randn(out, generator=g)
    return x, pack_decode_weight(weight, precision), bias


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 16])
@pytest.mark.parametrize("dim,out", [(37, 9), (515, 70), (64, 24), (130, 200)])
def test_every_blocking_matches_the_spec_and_the_others_bit_for_bit(monkeypatch, precision, rows, dim, out):
    """(515, 70) and (130, 200): segments of whole groups plus a tail of rows past them; (37, 9), (64, 24): too few
    rows for a segment per block row at some R (the tail alone)."""
    x, packed, bias = _problem(precision, rows, dim, out, seed=rows * 100 + dim)
    results = {}
    for blocking in BLOCKINGS:
        monkeypatch.setenv(ENV, blocking)
        results[blocking] = _run(x, packed, bias, gelu=True)
    expected = F.gelu(F.linear(x.double(), _dequantized(packed, torch.float64), bias.double()))
    baseline = F.gelu(F.linear(x, _dequantized(packed, torch.float32), bias))
    for blocking in BLOCKINGS:
        assert_close_to_reference(results[blocking], expected, baseline, name=f"decode_linear {precision}, {blocking}")
        assert torch.equal(results["wide"], results[blocking])  # one order of summation for every output


@pytest.mark.parametrize("dim", [8, 16, 24, 27, 31, 33, 47, 4096 + 24 + 5, 8192 + 16])
def test_bf16_one_row_pairs_at_every_remainder(monkeypatch, dim):
    """bfloat16 weights against one row of x are read 2 * lanes at a time (even and odd columns, linear_kernel.h's
    kPairs) with x reordered to match: dims that leave a single vector, a scalar tail, or both, after the pairs, within
    one chunk of columns or past a chunk's end (4096 columns)."""
    x, packed, bias = _problem("bf16", 1, dim, 45, seed=dim)
    expected = F.linear(x.double(), _dequantized(packed, torch.float64), bias.double())
    baseline = F.linear(x, _dequantized(packed, torch.float32), bias)
    results = {}
    for blocking in BLOCKINGS:
        monkeypatch.setenv(ENV, blocking)
        results[blocking] = _run(x, packed, bias, gelu=False)
        assert_close_to_reference(results[blocking], expected, baseline, name=f"decode_linear bf16 D={dim}, {blocking}")
        assert torch.equal(results["wide"], results[blocking])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_every_blocking_gives_the_same_bits_at_any_thread_count(monkeypatch, precision, blocking):
    """The threads split the rows in groups of 8 and each blocks its own share (segments: of that share), so the bits
    are the one-thread bits."""
    monkeypatch.setenv(ENV, blocking)
    x, packed, bias = _problem(precision, 1, 256, 8 * 37 + 5, seed=11)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run(x, packed, bias, gelu=False))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_auto_measures_then_reports_and_never_changes_a_bit(monkeypatch, precision):
    monkeypatch.setenv(ENV, "auto")
    rows, dim, out = 3, 257 + PRECISIONS.index(precision), 41  # a shape no other test measures
    x, packed, bias = _problem(precision, rows, dim, out, seed=7)
    first = _run(x, packed, bias, gelu=False)
    for _ in range(40):  # 32 timed calls rotate the four blockings, then the choice serves the rest
        assert torch.equal(_run(x, packed, bias, gelu=False), first)
    mine = [c for c in blocking_choices() if (c["rows"], c["dim"], c["out_features"]) == (rows, dim, out)]
    assert len(mine) == 1, blocking_choices()
    choice = mine[0]
    assert choice["dtype"] == {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}[precision]
    assert choice["threads"] == torch.get_num_threads()
    assert choice["chosen"] in BLOCKINGS
    assert all(choice["gb_per_s"][b] > 0 for b in BLOCKINGS)
    faster = max(choice["gb_per_s"], key=choice["gb_per_s"].get)
    if choice["chosen"] == "single":  # single is taken only when ahead (by the margin)
        assert faster == "single"
    else:  # otherwise the fastest of the blocked ones
        assert choice["chosen"] == max(("wide", "spread", "segments"), key=choice["gb_per_s"].get)


def test_a_forced_blocking_measures_nothing(monkeypatch):
    monkeypatch.setenv(ENV, "single")
    x, packed, bias = _problem("fp32", 2, 129, 23, seed=3)
    for _ in range(20):
        _run(x, packed, bias, gelu=False)
    assert not [c for c in blocking_choices() if (c["rows"], c["dim"], c["out_features"]) == (2, 129, 23)]


def test_an_unknown_blocking_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(ENV, "narrow")
    x, packed, bias = _problem("fp32", 1, 16, 8, seed=1)
    with pytest.raises(RuntimeError, match=f"{ENV} must be one of auto, wide, spread, single, segments; got 'narrow'"):
        _run(x, packed, bias, gelu=False)
