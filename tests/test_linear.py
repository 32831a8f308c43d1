"""mmdkernels.decode_linear (few-row linear of a decode step) against F.linear in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_to_reference

import mmdkernels
from mmdkernels import _ext
from mmdkernels.linear import MAX_ROWS, decode_linear, decode_linear_ref, pack_decode_weight

DTYPES = (torch.float64, torch.float32)  # the reference's, the kernel's (and the rule's baseline's)
needs_cpp = pytest.mark.skipif(not _ext.available("cpu"), reason="the C++ extension is not built")


def _torch_linear(x, weight, bias=None, activation=None):
    """F.linear (+ F.gelu) in the dtype of its inputs: in float64 the reference, in x's dtype the rule's baseline."""
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y


def _assert_close(y, x, weight, bias=None, activation=None):
    """The kernel against F.linear in float64, by the rule of tests/tolerances.py (baseline: F.linear in float32)."""
    assert y.shape == x.shape[:-1] + weight.shape[:1] and y.dtype == x.dtype
    expected = _torch_linear(*(t if t is None else t.double() for t in (x, weight, bias)), activation)
    baseline = _torch_linear(x, weight, bias, activation)
    assert_close_to_reference(y, expected, baseline, name=f"decode_linear, activation {activation}")


@needs_cpp
@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 1))
@pytest.mark.parametrize("dim,out", [(1, 1), (7, 5), (16, 8), (33, 9), (100, 37), (512, 130)])
def test_kernel_matches_float64(rows, dim, out):
    g = torch.Generator().manual_seed(rows * 1000 + dim + out)
    x = torch.randn(rows, dim, generator=g)
    weight = torch.randn(out, dim, generator=g)
    y = decode_linear(x, weight, backend="cpp")
    _assert_close(y, x, weight)


@needs_cpp
@pytest.mark.parametrize("amx", ["1", "0"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16])
def test_every_path(precision, rows, amx, monkeypatch):
    """Weights where the CPU has AMX tiles (csrc/linear/linear_amx.h: bfloat16 from 5 rows, float32 split in three
    bfloat16 parts from 13; 16-row tiles, 32-column steps, then the rows and columns left over; int8 on AMX-INT8 tiles
    at every row count, csrc/linear/linear_amx_int8.h, 64-column steps and a float32 tail) and with
    MMDKERNELS_LINEAR_AMX=0 (the FMA kernel, where rows past one pass reuse the weights the first pass widened), over
    several chunks of D (x's: 16 KiB for all rows) plus lines, vectors and a tail, and row blocks plus leftover rows;
    1 and 2 threads; every row count from 5 (x's packing for the tiles masks the rows it stores). float32 weights
    span 2^-40..2^40 in magnitude, so that the split's three parts all matter."""
    monkeypatch.setenv("MMDKERNELS_LINEAR_AMX", amx)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1003, generator=g)
    weight = torch.randn(45, 1003, generator=g)
    if precision == "fp32":
        weight = weight * torch.exp2(torch.randint(-40, 41, weight.shape, generator=g).float())
    packed = pack_decode_weight(weight, precision)
    ref64 = decode_linear_ref(x.double(), packed.double() if precision == "fp32" else packed)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = decode_linear(x, packed, backend="cpp")
            assert_close_to_reference(y, ref64, decode_linear_ref(x, packed), name=f"{precision}, {n} threads")
    finally:
        torch.set_num_threads(threads)


@needs_cpp
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_and_gelu_epilogue(rows, with_bias):
    g = torch.Generator().manual_seed(rows + 7 * with_bias)
    x = torch.randn(rows, 96, generator=g)
    weight = torch.randn(77, 96, generator=g) / 8
    bias = torch.randn(77, generator=g) if with_bias else None
    for activation in (None, "gelu"):
        y = decode_linear(x, weight, bias, activation=activation, backend="cpp")
        _assert_close(y, x, weight, bias, activation)
        torch_backend = decode_linear(x, weight, bias, activation=activation, backend="torch")
        assert torch.equal(torch_backend, _torch_linear(x, weight, bias, activation))  # the same call


@needs_cpp
@pytest.mark.parametrize("amx", ["1", "0"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 4, 5, 13, 16])
def test_gelu_over_its_whole_range(precision, rows, amx, monkeypatch):
    """The fused GELU (erf by Abramowitz & Stegun 7.1.26, csrc/linear/linear_kernel.h) on pre-activations from -12 to
    12 (signed zeros, tiny values), on every path (FMA kernel; AMX tiles from 5 rows for bf16, 13 for fp32, every row
    count for int8): against float64 F.gelu of the kernel's own pre-activation, within 1e-7 |x| (the
    approximation's 1.5e-7 error in erf, halved by GELU's 0.5 x) plus 4 roundings of the result, element by element;
    the negative tail keeps its
    sign and stays finite (it is computed as x erfc(|x| / sqrt 2) / 2, not as 1 + erf, which cancels)."""
    monkeypatch.setenv("MMDKERNELS_LINEAR_AMX", amx)
    dim = 384
    x = torch.linspace(-12, 12, rows * dim).view(rows, dim)
    x[0, :6] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7])
    weight = pack_decode_weight(torch.eye(dim), precision)
    pre = decode_linear(x, weight, backend="cpp").double()
    y = decode_linear(x, weight, activation="gelu", backend="cpp").double()
    ref = F.gelu(pre)
    err = (y - ref).abs()
    bound = 1e-7 * pre.abs() + 4 * torch.finfo(torch.float32).eps * ref.abs()
    at = int((err - bound).argmax())
    assert bool((err <= bound).all()), f"x = {pre.flatten()[at]:.6g}: {y.flatten()[at]:.8g} vs {ref.flatten()[at]:.8g}"
    assert bool((y[pre < 0] <= 0).all()) and bool(torch.isfinite(y).all())


@needs_cpp
def test_leading_dims_bias_and_strided_rows():
    g = torch.Generator().manual_seed(1)
    storage = torch.randn(3, 1, 70, generator=g)
    x = storage[..., 3:67]  # rows 70 floats apart: not contiguous
    weight = torch.randn(45, 64, generator=g)
    bias = torch.randn(45, generator=g)
    y = decode_linear(x, weight, bias, backend="cpp")
    assert y.shape == (3, 1, 45)
    _assert_close(y, x, weight, bias)
    xt = torch.randn(64, 4, generator=g).t()  # last dim strided: copied to rows first
    _assert_close(decode_linear(xt, weight, backend="cpp"), xt, weight)


@needs_cpp
def test_threads_split_the_output_rows():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 257, generator=g)
    weight = torch.randn(1031, 257, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = decode_linear(x, weight, backend="cpp")
        torch.set_num_threads(1)
        one = decode_linear(x, weight, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each output is summed by one thread in a fixed order
    _assert_close(one, x, weight)


def test_auto_falls_back_to_torch_where_the_kernel_cannot_run():
    """Where the kernel cannot run, "auto" makes exactly the F.linear call that backend="torch" makes: the same code
    path, so the results are equal bit for bit (F.linear on another layout of the same weight would be another BLAS
    path, equal only to rounding)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 8, generator=g)
    many = torch.randn(MAX_ROWS + 1, 8, generator=g)
    assert torch.equal(decode_linear(many, weight), F.linear(many, weight))
    half = torch.randn(2, 8, generator=g, dtype=torch.float64)
    assert torch.equal(decode_linear(half, weight.double()), F.linear(half, weight.double()))
    x = torch.randn(2, 8, generator=g, requires_grad=True)
    decode_linear(x, weight).sum().backward()  # autograd: F.linear's backward
    column_sums = [weight.double().sum(0).expand(2, 8), weight.sum(0).expand(2, 8)]  # float64, float32
    assert_close_to_reference(x.grad, *column_sums, name="F.linear's backward", kind="gradient")
    strided = weight.t().contiguous().t()  # not contiguous: the kernel cannot take it
    y = decode_linear(x.detach(), strided)
    assert torch.equal(y, F.linear(x.detach(), strided))
    _assert_close(y, x.detach(), weight)  # and the strided GEMM is still F.linear's maths


@needs_cpp
def test_cpp_backend_says_why_it_cannot_run():
    weight = torch.randn(6, 8)
    with pytest.raises(RuntimeError, match="at most 16"):
        decode_linear(torch.randn(MAX_ROWS + 1, 8), weight, backend="cpp")
    with pytest.raises(RuntimeError, match="float32"):
        decode_linear(torch.randn(2, 8, dtype=torch.float64), weight.double(), backend="cpp")
    with pytest.raises(RuntimeError, match="autograd"):
        decode_linear(torch.randn(2, 8, requires_grad=True), weight, backend="cpp")


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \[N, D = 8\]"):
        decode_linear(x, torch.randn(6, 7))
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        decode_linear(x, torch.randn(6, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bias must have shape \[N = 6\]"):
        decode_linear(x, torch.randn(6, 8), torch.randn(5))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        decode_linear(torch.ones(2, 8, dtype=torch.long), torch.randn(6, 8))
    with pytest.raises(ValueError, match="backend must be one of"):
        decode_linear(x, torch.randn(6, 8), backend="cuda")
    with pytest.raises(ValueError, match="activation must be one of"):
        decode_linear(x, torch.randn(6, 8), activation="relu")
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        decode_linear(x, torch.randn(6, 8), torch.randn(6, dtype=torch.float64))


@needs_cpp
def test_the_op_checks_its_arguments_itself():
    op = torch.ops.mmdkernels.small_batch_linear
    with pytest.raises(RuntimeError, match="weight must have shape"):
        op(torch.randn(2, 8), torch.randn(6, 9), None, False)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        op(torch.randn(2, 8), torch.randn(8, 6).t(), None, False)
    with pytest.raises(RuntimeError, match="x must have at most 16 rows"):
        op(torch.randn(17, 8), torch.randn(6, 8), None, False)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(torch.randn(2, 8), torch.randn(6, 8), torch.randn(5), False)


@needs_cpp
def test_compiles_without_graph_breaks():
    weight = torch.randn(12, 16)
    x = torch.randn(3, 16)
    bias = torch.randn(12)
    compiled = torch.compile(
        lambda x: torch.relu(mmdkernels.decode_linear(x, weight, bias, activation="gelu")), fullgraph=True
    )
    with torch.no_grad():
        y = compiled(x)
    expected, baseline = (torch.relu(_torch_linear(*(t.to(d) for t in (x, weight, bias)), "gelu")) for d in DTYPES)
    assert_close_to_reference(y, expected, baseline, name="compiled decode_linear + relu")
