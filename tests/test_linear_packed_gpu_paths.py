"""The GPU paths of decode_linear with packed weights (bf16, fp16, int8 + scales): the Triton kernel
(mmdkernels/linear/triton_kernels.py) under the interpreter on CPU tensors, and on a CUDA device the compiled Triton
kernel and the CUDA kernel (csrc/linear/linear_cuda.cu); fp16 packing and its CPU fallback; the model's decode path
on packed weights without a per-call dequantised copy, and its CUDA-graph step.

The rule of tests/tolerances.py, as tests/test_linear_quantized.py states it: the kernel against decode_linear_ref on
the packed weight in float64 (the dequantised weights are exact there), PyTorch's float32 run of the same reference
as the baseline.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_quantize_decode import decode_all, dequantized_copy, tiny_model
from tolerances import assert_close_to_reference
from triton_cases import interpreter_marks

from mmdkernels import _dispatch, _ext
from mmdkernels.linear import MAX_ROWS, QuantizedLinearWeight, decode_linear, decode_linear_ref, pack_decode_weight
from mmdkernels.linear import ops as linear_ops
from mmdkernels.patterns import PATTERNS
from models.lm import quantize_for_decode, teacher_forcing

PACKED = ("bf16", "fp16", "int8")
NEEDS_TRITON = pytest.mark.skipif(not _ext.triton_installed(), reason="the Triton backend needs the triton package")
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
INTERPRETED = [NEEDS_TRITON, *interpreter_marks("the triton-cuda cases of this file")]


def interpreted(test):
    """Marks a test that runs the Triton kernel on CPU tensors (the interpreter)."""
    for mark in INTERPRETED:
        test = mark(test)
    return test


# (device, backend): the interpreter on CPU tensors here; both kernels on a GPU
PATHS = [
    pytest.param("cpu", "triton", marks=INTERPRETED, id="triton-interpreter"),
    pytest.param("cuda", "triton", marks=[NEEDS_TRITON, NEEDS_CUDA], id="triton-cuda"),
    pytest.param("cuda", "cuda", marks=NEEDS_CUDA, id="cuda"),
]
# (N, D): odd sizes below and above a 128-weight chunk, D = 700 split into ranges (tests the combine kernel; on the
# CUDA kernel, D a multiple of neither vector: the scalar loop), and D = 512 (the CUDA kernel's 16-byte loads)
SHAPES = [(1, 1), (67, 45), (67, 130), (29, 700), (40, 512)]


def _needs_backend(backend: str) -> None:
    if backend == "cuda" and not _ext.available("cuda"):
        pytest.skip(reason=f"the CUDA extension is not built: {_ext.load_error('cuda')}")


def assert_matches_reference(y, x, packed, bias=None, activation=None, name=""):
    """The kernel against decode_linear_ref in float64, by the rule (baseline: the reference in float32)."""
    assert y.shape == x.shape[:-1] + packed.shape[:1] and y.dtype == torch.float32
    ref64 = decode_linear_ref(x.double(), packed, None if bias is None else bias.double(), activation=activation)
    baseline = decode_linear_ref(x, packed, bias, activation=activation)
    assert_close_to_reference(y, ref64, baseline, name=f"{name} {packed.precision} activation {activation}")


def _problem(precision, rows, out, dim, seed, device, with_bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g)
    packed = pack_decode_weight(torch.randn(out, dim, generator=g) / dim**0.5, precision)
    bias = torch.randn(out, generator=g) if with_bias else None
    return x.to(device), packed.to(device), None if bias is None else bias.to(device)


@pytest.mark.parametrize("device, backend", PATHS)
@pytest.mark.parametrize("precision", PACKED)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_reference(device, backend, precision, rows, with_bias):
    _needs_backend(backend)
    for out, dim in SHAPES:
        x, packed, bias = _problem(precision, rows, out, dim, rows * 1000 + out + dim, device, with_bias)
        for activation in (None, "gelu"):
            y = decode_linear(x, packed, bias, activation=activation, backend=backend)
            assert_matches_reference(y, x, packed, bias, activation, name=f"{backend} [{out}, {dim}]")


@pytest.mark.parametrize("device, backend", PATHS)
@pytest.mark.parametrize("precision", PACKED)
def test_leading_dims_and_strided_views(device, backend, precision):
    """Rows 70 floats apart under leading dims; a weight slice of a larger packed matrix (the model's per-codebook
    heads); for Triton also a column-major weight (any strides)."""
    _needs_backend(backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 70, generator=g).to(device)[..., 3:67]
    whole = pack_decode_weight(torch.randn(90, 64, generator=g) / 8, precision).to(device)
    rows = slice(45, 90)
    packed = QuantizedLinearWeight(whole.data[rows], None if whole.scale is None else whole.scale[rows])
    bias = torch.randn(45, generator=g).to(device)
    y = decode_linear(x, packed, bias, backend=backend)
    assert y.shape == (3, 2, 45)
    assert_matches_reference(y, x, packed, bias, name=f"{backend} slice")
    if backend == "triton":
        column_major = QuantizedLinearWeight(packed.data.t().contiguous().t(), packed.scale)
        assert not column_major.data.is_contiguous()
        y = decode_linear(x, column_major, bias, activation="gelu", backend=backend)
        assert_matches_reference(y, x, column_major, bias, "gelu", name="triton column-major")


@NEEDS_TRITON
def test_plan_exercises_every_path():
    """The shapes above reach the elementwise and tl.dot paths, with and without splitting D."""
    from mmdkernels.linear import triton_kernels

    cpu = torch.device("cpu")
    assert not triton_kernels.plan(cpu, 8, 67, 130)["use_dot"] and triton_kernels.plan(cpu, 9, 67, 130)["use_dot"]
    assert triton_kernels.plan(cpu, 3, 29, 700)["splits"] > 1 and triton_kernels.plan(cpu, 16, 29, 700)["splits"] > 1
    assert triton_kernels.plan(cpu, 3, 67, 45)["splits"] == 1
    for rows in range(1, MAX_ROWS + 1):
        p = triton_kernels.plan(cpu, rows, 29, 700)
        covered = p["chunks_per_split"] * p["block_k"]  # D per split: every split has a chunk, together they cover D
        assert p["splits"] * covered >= 700 > (p["splits"] - 1) * covered


@pytest.mark.parametrize("device, backend", PATHS)
def test_opcheck(device, backend):
    _needs_backend(backend)
    op = linear_ops.small_batch_linear_quantized_op(backend)
    for precision, rows, with_bias in (("bf16", 1, False), ("fp16", 5, True), ("int8", 16, True)):
        x, packed, bias = _problem(precision, rows, 19, 70, rows, device, with_bias)
        torch.library.opcheck(op, (x, packed.data, packed.scale, bias, with_bias))


@interpreted
def test_bad_input_names_the_argument():
    op = linear_ops.small_batch_linear_quantized_op("triton")
    x, q, scale = torch.randn(2, 8), torch.ones(6, 8, dtype=torch.int8), torch.ones(6)
    with pytest.raises(TypeError, match=r"x must be a float32 tensor \[M, D\], got torch.float64"):
        op(x.double(), q, scale, None, False)
    with pytest.raises(ValueError, match="x must have at most 16 rows"):
        op(torch.randn(17, 8), q, scale, None, False)
    with pytest.raises(TypeError, match="weight must have dtype torch.bfloat16, torch.float16 or torch.int8"):
        op(x, q.float(), None, None, False)
    with pytest.raises(ValueError, match=r"weight must have shape \[N, D = 8\]"):
        op(x, torch.ones(6, 9, dtype=torch.int8), scale, None, False)
    with pytest.raises(ValueError, match=r"scale must be a float32 tensor \[N = 6\] for int8 weights, got None"):
        op(x, q, None, None, False)
    with pytest.raises(ValueError, match="scale must be None for torch.float16 weights"):
        op(x, q.half(), scale, None, False)
    with pytest.raises(ValueError, match=r"bias must be a float32 tensor \[N = 6\]"):
        op(x, q, scale, torch.randn(5), False)
    packed = QuantizedLinearWeight(q, scale)
    with pytest.raises(RuntimeError, match="'triton' cannot run this input: .*activations torch.float64: the kernel"):
        decode_linear(x.double(), packed, backend="triton")
    with pytest.raises(RuntimeError, match="17 rows: the kernel takes at most 16"):
        decode_linear(torch.randn(17, 8), packed, backend="triton")


@NEEDS_TRITON
def test_triton_says_why_it_cannot_run_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    packed = pack_decode_weight(torch.randn(6, 8), "fp16")
    with pytest.raises(RuntimeError, match="Triton runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1"):
        decode_linear(torch.randn(2, 8), packed, backend="triton")


@pytest.mark.parametrize("device, backend", PATHS[:2])
def test_torch_compile_fullgraph(device, backend):
    x, packed, bias = _problem("fp16", 4, 33, 48, 6, device, with_bias=True)

    def step(x):
        return decode_linear(x, packed, bias, activation="gelu", backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # traces with the fake, no codegen
    with torch.no_grad():
        assert torch.equal(compiled(x), step(x))  # the same op on the same inputs


def test_automatic_order_per_device():
    """CUDA, packed weights, 1-16 rows: the CUDA kernel, then Triton's, then F.linear on a dequantised copy (as
    measured on an H200). CPU: the C++ kernel. More rows: torch's GEMM."""

    def rows_on(device: str, rows: int):
        return types.SimpleNamespace(device=torch.device(device), shape=(rows, 8), numel=lambda: rows * 8)

    order = _dispatch.OPS["decode_linear_quantized"].priority
    assert order(rows_on("cuda", 16)) == ("cuda", "triton", "torch", "reference")
    assert order(rows_on("cuda", 17)) == ("torch", "reference")
    assert order(rows_on("cpu", 1)) == ("cpp", "torch", "reference")


def test_fp16_packing_round_trip():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(9, 50, generator=g)
    fp16 = pack_decode_weight(weight, "fp16")
    assert fp16.precision == "fp16" and fp16.scale is None and fp16.data.dtype == torch.float16
    assert fp16.data.is_contiguous() and fp16.nbytes == 9 * 50 * 2
    assert torch.equal(fp16.dequantize(), weight.half().float())  # exact in float32: rounded once, to nearest even
    assert torch.equal(fp16.dequantize(torch.float64), weight.half().double())
    error = (fp16.dequantize() - weight).abs()
    assert (error <= weight.abs() * 2.0**-11 + 2.0**-25).all()  # half a unit in the last place (subnormals: 2^-24)
    assert torch.equal(pack_decode_weight(fp16.dequantize(), "fp16").data, fp16.data)  # packing is idempotent
    with pytest.raises(ValueError, match="weight has entries beyond float16's range"):
        pack_decode_weight(torch.tensor([[1.0, 7e4]]), "fp16")
    with pytest.raises(ValueError, match="scale must be None for float16 data"):
        QuantizedLinearWeight(fp16.data, torch.ones(9))


def test_fp16_on_cpu_falls_back_to_torch_quietly():
    """The C++ kernel streams bf16 and int8 only: fp16 weights on CPU go to "torch" (dequantise, F.linear) without a
    warning, and asking for "cpp" says why."""
    g = torch.Generator().manual_seed(3)
    packed = pack_decode_weight(torch.randn(6, 40, generator=g), "fp16")
    x = torch.randn(3, 40, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = decode_linear(x, packed, activation="gelu")
    assert torch.equal(y, F.gelu(F.linear(x, packed.dequantize())))
    if _ext.available("cpu"):
        with pytest.raises(RuntimeError, match="float16 weights: the C\\+\\+ kernel streams bfloat16 or int8"):
            decode_linear(x, packed, backend="cpp")


# ---------------------------------------------------------------------------------------------------------------------
# The model's decode path on packed weights
# ---------------------------------------------------------------------------------------------------------------------


def _no_dequantize(self, dtype=torch.float32):
    raise AssertionError("a decode step made a dequantised copy of a packed weight")


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("pattern", PATTERNS)
@interpreted
def test_model_decode_streams_the_packed_weights(pattern, seeded, monkeypatch):
    """Through the Triton kernel (forced here; on CUDA the dispatcher picks the CUDA kernel, then Triton's) a decode
    step, the int step and the fixed-shape (CUDA-graph) variant alike, never dequantises a weight, and both match the
    model with the dequantised weights in float64 (the spec) by the rule, that model in float32 as the baseline."""
    model = quantize_for_decode(tiny_model(pattern), "fp16")
    specs = {dtype: dequantized_copy(model, dtype) for dtype in (torch.float64, torch.float32)}
    codes = torch.randint(0, 17, (2, 3, 4), generator=seeded)
    inputs, _, _ = teacher_forcing(codes, pattern, model.config.special)
    with torch.no_grad():
        steps = inputs.shape[2]
        caches = {name: model.new_cache(model.encode_condition(["a", None]), steps) for name in ("int", "tensor")}
        caches |= {dtype: m.new_cache(m.encode_condition(["a", None]), steps) for dtype, m in specs.items()}
        monkeypatch.setenv("MMDKERNELS_BACKEND_DECODE_LINEAR_QUANTIZED", "triton")
        monkeypatch.setenv("MMDKERNELS_BACKEND_DECODE_LAYERS", "reference")
        for s in range(steps):
            tokens = inputs[:, :, s]
            with monkeypatch.context() as patched:
                patched.setattr(QuantizedLinearWeight, "dequantize", _no_dequantize)
                logits_by_step = {
                    "int": model.decode_step(tokens, s, caches["int"]),
                    "tensor": model.decode_step(tokens, torch.tensor([s]), caches["tensor"]),
                }
            ref64, baseline = (m.decode_step(tokens, s, caches[dtype]) for dtype, m in specs.items())
            for name, logits in logits_by_step.items():
                assert_close_to_reference(logits, ref64, baseline, name=f"fp16 {pattern} {name} step {s}")


@pytest.mark.usefixtures("single_thread")
def test_fp16_model_on_cpu_takes_the_per_layer_path(seeded):
    """The fused C++ step streams fp32, bf16 and int8 projections: an fp16 model decodes layer by layer on CPU, and
    matches its dequantised spec."""
    model = quantize_for_decode(tiny_model("delay"), "fp16")
    condition = model.encode_condition(["a", None])
    codes = torch.randint(0, 17, (2, 3, 4), generator=seeded)
    inputs, _, _ = teacher_forcing(codes, "delay", model.config.special)
    with torch.no_grad():
        x = model._embed(inputs[:, :, :1], torch.tensor([0]))
        assert model._fused_decode_layers(x, model.new_cache(condition, 2)) is None
    logits = decode_all(model, inputs, ["a", None])
    spec64, baseline = (decode_all(dequantized_copy(model, dtype), inputs, ["a", None])
                        for dtype in (torch.float64, torch.float32))  # fmt: skip
    assert_close_to_reference(logits, spec64, baseline, name="fp16 per-layer decode logits")


@NEEDS_CUDA
@NEEDS_TRITON
@pytest.mark.parametrize("precision", PACKED)
@pytest.mark.parametrize("pattern", ["delay", "flatten"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_step_with_packed_weights(precision, pattern, backend, monkeypatch):
    """The captured step (the CUDA or the Triton kernels inside the graph; the dispatcher picks CUDA's) and the eager
    int step, against the float64 model on the dequantised weights by the rule, that model in float32 as the
    baseline."""
    from models.generate import GraphedStep

    if backend == "cuda" and not _ext.available("cuda"):
        pytest.skip(reason=f"the CUDA extension is not built: {_ext.load_error('cuda')}")
    model = quantize_for_decode(tiny_model(pattern).cuda(), precision)
    specs = {dtype: dequantized_copy(model, dtype) for dtype in (torch.float64, torch.float32)}
    codes = torch.randint(0, 17, (2, 3, 4), device="cuda")
    inputs, _, _ = teacher_forcing(codes, pattern, model.config.special)
    with torch.inference_mode():
        caches = {dtype: m.new_cache(m.encode_condition(["a", None]), inputs.shape[2]) for dtype, m in specs.items()}
        eager_cache, graph_cache = (model.new_cache(model.encode_condition(["a", None]), inputs.shape[2]) for _ in "ab")
        monkeypatch.setenv("MMDKERNELS_BACKEND_DECODE_LINEAR_QUANTIZED", backend)  # the steps' 2-row linears
        graphed = GraphedStep(model, graph_cache, 2)
        for s in range(inputs.shape[2]):
            eager = model.decode_step(inputs[:, :, s], s, eager_cache)
            ref64, baseline = (m.decode_step(inputs[:, :, s], s, caches[dtype]) for dtype, m in specs.items())
            assert_close_to_reference(eager, ref64, baseline, name=f"{precision} {pattern} eager step {s}")
            replayed = graphed(inputs[:, :, s], s)
            assert_close_to_reference(replayed, ref64, baseline, name=f"{precision} {pattern} graphed step {s}")
