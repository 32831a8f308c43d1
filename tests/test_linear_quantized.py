"""mmdkernels.decode_linear with weights stored in bfloat16 or int8 (pack_decode_weight) against decode_linear_ref.

The spec is decode_linear_ref on the packed weight: dequantise, then the float maths. In float64 the dequantised
weights are exact (a bfloat16 is a float32 with a shorter mantissa; an int8 code times a float32 scale has at most
7 + 24 significant bits), so the kernel against the float64 reference differs only by its float32 arithmetic: the
rule of tests/tolerances.py, with PyTorch's float32 run of the same reference (dequantise to float32, then the GEMM)
as the baseline: kernel error <= 2 x baseline error + 8 eps32 x max|reference|. The error of the quantisation itself
(what int8 costs against the float32 weights) belongs to the weights and is tested on pack_decode_weight's rule.

Run the file under MMDKERNELS_CPU_CAPABILITY=avx2 as well to test the AVX2 library's kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_to_reference

from mmdkernels import _ext
from mmdkernels.linear import MAX_ROWS, QuantizedLinearWeight, decode_linear, decode_linear_ref, pack_decode_weight

QUANTIZED = ("bf16", "int8")
needs_cpp = pytest.mark.skipif(not _ext.available("cpu"), reason="the C++ extension is not built")
# D covers: one element; fewer than a vector (8 or 16 lanes); vectors plus a tail; whole cache lines of int8 (64)
# and bfloat16 (32) weights plus vectors plus a tail.
SHAPES = [(1, 1), (7, 5), (33, 9), (100, 37), (203, 19)]


def _packed(precision, out, dim, g):
    return pack_decode_weight(torch.randn(out, dim, generator=g), precision)


def _assert_matches_reference(y, x, packed, bias=None, activation=None):
    """The kernel against decode_linear_ref in float64, by the rule (baseline: the reference in float32)."""
    assert y.shape == x.shape[:-1] + packed.shape[:1] and y.dtype == torch.float32
    ref64 = decode_linear_ref(x.double(), packed, None if bias is None else bias.double(), activation=activation)
    baseline = decode_linear_ref(x, packed, bias, activation=activation)
    assert_close_to_reference(y, ref64, baseline, name=f"{packed.precision} decode_linear, activation {activation}")


@needs_cpp
@pytest.mark.parametrize("precision", QUANTIZED)
@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 1))
def test_kernel_matches_float64_reference(precision, rows):
    for dim, out in SHAPES:
        g = torch.Generator().manual_seed(rows * 1000 + dim + out)
        x = torch.randn(rows, dim, generator=g)
        packed = _packed(precision, out, dim, g)
        y = decode_linear(x, packed, backend="cpp")
        _assert_matches_reference(y, x, packed)


@needs_cpp
@pytest.mark.parametrize("precision", QUANTIZED)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_and_gelu_epilogue(precision, rows, with_bias):
    g = torch.Generator().manual_seed(rows + 7 * with_bias)
    x = torch.randn(rows, 161, generator=g)
    packed = pack_decode_weight(torch.randn(77, 161, generator=g) / 8, precision)
    bias = torch.randn(77, generator=g) if with_bias else None
    for activation in (None, "gelu"):
        y = decode_linear(x, packed, bias, activation=activation, backend="cpp")
        _assert_matches_reference(y, x, packed, bias, activation)


@needs_cpp
@pytest.mark.parametrize("precision", QUANTIZED)
def test_leading_dims_and_strided_rows(precision):
    g = torch.Generator().manual_seed(1)
    storage = torch.randn(3, 2, 70, generator=g)
    x = storage[..., 3:67]  # rows 70 floats apart: not contiguous
    packed = _packed(precision, 45, 64, g)
    bias = torch.randn(45, generator=g)
    y = decode_linear(x, packed, bias, backend="cpp")
    assert y.shape == (3, 2, 45)
    _assert_matches_reference(y, x, packed, bias)


@needs_cpp
@pytest.mark.parametrize("precision", QUANTIZED)
def test_threads_split_the_output_rows(precision):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(13, 257, generator=g)
    packed = _packed(precision, 1031, 257, g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = decode_linear(x, packed, backend="cpp")
        torch.set_num_threads(1)
        one = decode_linear(x, packed, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each output is summed by one thread in a fixed order
    _assert_matches_reference(one, x, packed)


@needs_cpp
@pytest.mark.parametrize("precision", QUANTIZED)
def test_automatic_choice(precision):
    """CPU, float32, 1 to 16 rows: the kernel (one row too: torch has no GEMV on these weights); more rows, or other
    activation dtypes: "torch", which dequantises and calls F.linear (the same call, so equal bit for bit)."""
    g = torch.Generator().manual_seed(3)
    packed = _packed(precision, 6, 40, g)
    for rows in (1, 2, MAX_ROWS):
        x = torch.randn(rows, 40, generator=g)
        assert torch.equal(decode_linear(x, packed), decode_linear(x, packed, backend="cpp"))
    many = torch.randn(MAX_ROWS + 1, 40, generator=g)
    assert torch.equal(decode_linear(many, packed), F.linear(many, packed.dequantize()))
    x64 = torch.randn(2, 40, generator=g, dtype=torch.float64)
    assert torch.equal(decode_linear(x64, packed), F.linear(x64, packed.dequantize(torch.float64)))
    assert torch.equal(decode_linear(x64, packed, backend="reference"), decode_linear_ref(x64, packed))


@needs_cpp
def test_cpp_backend_says_why_it_cannot_run():
    packed = pack_decode_weight(torch.randn(6, 8), "int8")
    with pytest.raises(RuntimeError, match="at most 16"):
        decode_linear(torch.randn(MAX_ROWS + 1, 8), packed, backend="cpp")
    with pytest.raises(RuntimeError, match="activations torch.float64: the kernel takes float32"):
        decode_linear(torch.randn(2, 8, dtype=torch.float64), packed, backend="cpp")


def test_pack_decode_weight_rules():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(9, 50, generator=g)
    weight[3] = 0.0  # an all-zero row: scale 1, codes 0
    fp32 = pack_decode_weight(weight, "fp32")
    assert fp32.data_ptr() == weight.data_ptr() and not fp32.requires_grad  # float32 and contiguous: no copy
    bf16 = pack_decode_weight(weight, "bf16")
    assert bf16.precision == "bf16" and bf16.scale is None and torch.equal(bf16.data, weight.bfloat16())
    assert torch.equal(bf16.dequantize(), weight.bfloat16().float())
    int8 = pack_decode_weight(weight, "int8")
    assert int8.precision == "int8" and int8.data.dtype == torch.int8 and int8.scale.dtype == torch.float32
    assert int8.data.abs().max() <= 127 and int8.data.abs().amax(1)[torch.arange(9) != 3].eq(127).all()
    assert int8.scale[3] == 1 and not int8.data[3].any()
    # round to nearest: every weight within half a step of its code (float64: the exact dequantised weight)
    error = (int8.dequantize(torch.float64) - weight.double()).abs()
    assert (error <= int8.scale.double()[:, None] * (0.5 + 1e-6)).all()
    assert int8.nbytes == 9 * 50 + 9 * 4 and bf16.nbytes == 9 * 50 * 2


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 8)
    packed = pack_decode_weight(torch.randn(6, 8), "int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        pack_decode_weight(torch.randn(6, 8), "int4")
    with pytest.raises(ValueError, match="weight must be a floating tensor"):
        pack_decode_weight(torch.ones(6, 8, dtype=torch.long), "int8")
    with pytest.raises(ValueError, match=r"weight must have shape \[N, D = 7\]"):
        decode_linear(torch.randn(2, 7), packed)
    with pytest.raises(ValueError, match=r"bias must have shape \[N = 6\]"):
        decode_linear(x, packed, torch.randn(5))
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        decode_linear(x, packed, torch.randn(6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"scale must be a float32 tensor \[N = 6\]"):
        QuantizedLinearWeight(packed.data, packed.scale[:5])
    with pytest.raises(ValueError, match="scale must be a float32 tensor"):
        QuantizedLinearWeight(packed.data)
    with pytest.raises(ValueError, match="scale must be None for bfloat16"):
        QuantizedLinearWeight(torch.randn(6, 8).bfloat16(), packed.scale)
    with pytest.raises(TypeError, match="data must have dtype torch.bfloat16, torch.float16 or torch.int8"):
        QuantizedLinearWeight(torch.randn(6, 8).double())
    with pytest.raises(ValueError, match="data must be a 2-d tensor"):
        QuantizedLinearWeight(torch.randn(6).bfloat16())


@needs_cpp
def test_the_op_checks_its_arguments_itself():
    op = torch.ops.mmdkernels.small_batch_linear_quantized
    x, q, scale = torch.randn(2, 8), torch.ones(6, 8, dtype=torch.int8), torch.ones(6)
    with pytest.raises(RuntimeError, match="scale must be given for int8 weights"):
        op(x, q, None, None, False)
    with pytest.raises(RuntimeError, match="scale must be None for bfloat16 weights"):
        op(x, q.bfloat16(), scale, None, False)
    with pytest.raises(RuntimeError, match="weight must have dtype BFloat16 or Char"):
        op(x, q.half(), None, None, False)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        op(x, q, torch.ones(5), None, False)
    with pytest.raises(RuntimeError, match="scale must have dtype"):
        op(x, q, torch.ones(6, dtype=torch.float64), None, False)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        op(x, torch.ones(6, 9, dtype=torch.int8), scale, None, False)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        op(x, torch.ones(8, 6, dtype=torch.int8).t(), scale, None, False)
    with pytest.raises(RuntimeError, match="x must have at most 16 rows"):
        op(torch.randn(17, 8), q, scale, None, False)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(x, q, scale, torch.randn(5), False)


@needs_cpp
@pytest.mark.parametrize("precision", QUANTIZED)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(precision, with_bias):
    g = torch.Generator().manual_seed(5)
    packed = _packed(precision, 19, 70, g)
    bias = torch.randn(19, generator=g) if with_bias else None
    for rows in (1, 16):
        args = (torch.randn(rows, 70, generator=g), packed.data, packed.scale, bias, with_bias)
        torch.library.opcheck(torch.ops.mmdkernels.small_batch_linear_quantized.default, args)


@needs_cpp
@pytest.mark.parametrize("precision", QUANTIZED)
def test_torch_compile_fullgraph(precision):
    g = torch.Generator().manual_seed(6)
    packed = _packed(precision, 33, 48, g)
    bias = torch.randn(33, generator=g)
    x = torch.randn(4, 48, generator=g)

    def step(x):
        return decode_linear(x, packed, bias, activation="gelu") * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # traces with the fakes, no C++ codegen
    with torch.no_grad():
        assert torch.equal(compiled(x), step(x))  # the same op on the same inputs
