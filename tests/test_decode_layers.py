"""mmdkernels.decode_layers: the compiled CPU decode step against its spec (decode_layers_ref, float64), the weight
order shared by Python and C++, the dispatcher's row rule, opcheck and clear errors."""

import pytest
import torch
from tolerances import assert_close_to_reference

import mmdkernels
from mmdkernels import _ext
from mmdkernels.decode import (
    DecoderLayerWeights,
    PreparedDecoderLayers,
    decode_layers,
    decode_layers_backend,
    decode_layers_ref,
    prepare_decode_layers,
)
from mmdkernels.decode import ops as decode_ops
from mmdkernels.decode.reference import PROJECTIONS
from mmdkernels.linear import QuantizedLinearWeight, pack_decode_weight

needs_cpu_kernels = pytest.mark.skipif(not _ext.available("cpu"), reason="no compiled CPU library")


def make_problem(batch, dim=32, heads=4, layers=2, ffn=48, s_max=9, cross=5, step=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    weights = [
        DecoderLayerWeights(
            1 + rand(dim, scale=0.1), rand(dim, scale=0.1), rand(3 * dim, dim, scale=dim**-0.5),
            rand(dim, dim, scale=dim**-0.5), 1 + rand(dim, scale=0.1), rand(dim, scale=0.1),
            rand(dim, dim, scale=dim**-0.5), rand(dim, dim, scale=dim**-0.5), 1 + rand(dim, scale=0.1),
            rand(dim, scale=0.1), rand(ffn, dim, scale=dim**-0.5), rand(dim, ffn, scale=ffn**-0.5),
        )  # fmt: skip
        for _ in range(layers)
    ]
    head_dim = dim // heads
    self_k, self_v = rand(layers, batch, heads, s_max, head_dim), rand(layers, batch, heads, s_max, head_dim)
    cross_k, cross_v = rand(layers, batch, heads, cross, head_dim), rand(layers, batch, heads, cross, head_dim)
    cross_lengths = torch.randint(1, cross + 1, (batch,), generator=g)
    return rand(batch, dim), weights, [self_k, self_v, cross_k, cross_v, cross_lengths], step, heads


def packed(problem, precision):
    """The problem with every projection stored in `precision` (the norms stay float32)."""
    x, weights, caches, step, heads = problem
    weights = [w._replace(**{n: pack_decode_weight(getattr(w, n), precision) for n in PROJECTIONS}) for w in weights]
    return x, weights, caches, step, heads


def as64(problem):
    """The problem in float64; packed projections stay packed (the reference dequantises them exactly)."""
    x, weights, caches, step, heads = problem
    return (
        x.double(),
        [DecoderLayerWeights(*(t if isinstance(t, QuantizedLinearWeight) else t.double() for t in w)) for w in weights],
        [c.double() if c.is_floating_point() else c for c in caches],
        step,
        heads,
    )


def run(problem, backend):
    x, weights, caches, step, heads = problem
    caches = [c.clone() for c in caches]
    with torch.no_grad():
        out = decode_layers(x, weights, *caches, step, num_heads=heads, backend=backend)
    return out, caches[0], caches[1]


def assert_step_matches_spec(problem, name: str) -> None:
    """The compiled step's output and K/V caches against the float64 reference, PyTorch's own float32 computation
    as the baseline (tests/tolerances.py)."""
    ref_out, ref_k, ref_v = run(as64(problem), "reference")
    base_out, base_k, base_v = run(problem, "reference")
    out, k, v = run(problem, "cpp")
    assert_close_to_reference(out, ref_out, base_out, name=f"{name} output")
    assert_close_to_reference(k, ref_k, base_k, name=f"{name} K cache")
    assert_close_to_reference(v, ref_v, base_v, name=f"{name} V cache")


def test_weight_order_is_the_one_the_op_documents():
    assert DecoderLayerWeights._fields == (
        "self_norm_weight", "self_norm_bias", "qkv", "self_out", "cross_norm_weight", "cross_norm_bias", "cross_q",
        "cross_out", "mlp_norm_weight", "mlp_norm_bias", "fc1", "fc2",
    )  # fmt: skip
    source = open("csrc/decode/decode_layers_cpu.cpp").read()
    order = ["kSelfNormWeight", "kSelfNormBias", "kQkv", "kSelfOut", "kCrossNormWeight", "kCrossNormBias", "kCrossQ"]
    order += ["kCrossOut", "kMlpNormWeight", "kMlpNormBias", "kFc1", "kFc2", "kWeightsPerLayer"]
    positions = [source.index(name + ",") for name in order]
    assert positions == sorted(positions)


@needs_cpu_kernels
@pytest.mark.parametrize("batch", [1, 2, 5, 16])
@pytest.mark.parametrize("step", [0, 4, 8])
def test_compiled_step_matches_the_spec(batch, step):
    assert_step_matches_spec(make_problem(batch, step=step, seed=batch * 10 + step), "decode_layers")


@needs_cpu_kernels
@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_compiled_step_with_packed_weights_matches_the_spec(precision, batch):
    """bf16 / int8 projections: the spec is the reference on the same dequantised weights in float64 (the rule of
    tests/tolerances.py), the baseline the same reference in float32."""
    problem = packed(make_problem(batch, step=3, seed=batch + 100), precision)
    assert_step_matches_spec(problem, f"decode_layers {precision}")


@needs_cpu_kernels
def test_automatic_choice():
    x, weights, *_ = make_problem(3)
    with torch.no_grad():
        assert decode_layers_backend(x, weights) == "cpp"
        assert decode_layers_backend(x.double(), [DecoderLayerWeights(*(t.double() for t in w)) for w in weights]) == (
            "reference"
        )
        assert decode_layers_backend(torch.zeros(17, 32), weights) == "reference"  # > 16 rows
    x.requires_grad_(True)
    assert decode_layers_backend(x, weights) == "reference"  # autograd: the spec is differentiable


@needs_cpu_kernels
@pytest.mark.parametrize("torch_linear", [False, True])
def test_opcheck(torch_linear):
    x, weights, caches, step, heads = make_problem(3)
    flat = [t for w in weights for t in w]
    torch.library.opcheck(decode_ops.decode_layers_op(), (x, flat, [], *caches, step, heads, 1e-5, torch_linear))


@needs_cpu_kernels
def test_opcheck_packed():
    x, weights, caches, step, heads = packed(make_problem(3), "int8")
    pairs = [(t.data, t.scale) if isinstance(t, QuantizedLinearWeight) else (t, None) for w in weights for t in w]
    args = (x, [t for t, _ in pairs], [s for _, s in pairs], *caches, step, heads, 1e-5, False)
    torch.library.opcheck(decode_ops.decode_layers_op(), args)


@needs_cpu_kernels
def test_compiled_op_checks_its_arguments():
    x, weights, caches, _, heads = make_problem(1, s_max=4)
    flat = [t for w in weights for t in w]
    op = decode_ops.decode_layers_op()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="weights must hold 12 tensors per layer"):
            op(x, flat[:-1], [], *caches, 0, heads, 1e-5, False)
        with pytest.raises(RuntimeError, match=r"step must be in \[0, S_max = 4\)"):
            op(x, flat, [], *caches, 4, heads, 1e-5, False)
        with pytest.raises(RuntimeError, match="caches must have shape"):
            op(torch.zeros(2, 32), flat, [], *caches, 0, heads, 1e-5, False)
        with pytest.raises(RuntimeError, match="num_heads must divide"):
            op(x, flat, [], *caches, 0, 5, 1e-5, False)
        with pytest.raises(RuntimeError, match="scales must be empty or hold one entry per weight"):
            op(x, flat, [None], *caches, 0, heads, 1e-5, False)
        with pytest.raises(RuntimeError, match="a scale belongs to int8 weights only"):
            op(x, flat, [torch.ones(96) if i == 2 else None for i in range(len(flat))], *caches, 0, heads, 1e-5, False)
        bad_norms = ((12 + 4, torch.ones(31)), (1, torch.ones(32, dtype=torch.float64)), (8, torch.ones(64)[::2]))
        for index, bad in bad_norms:
            with pytest.raises(RuntimeError, match=rf"weights\[{index}\] \(a LayerNorm weight or bias of layer"):
                op(x, [bad if i == index else t for i, t in enumerate(flat)], [], *caches, 0, heads, 1e-5, False)


def test_wrapper_errors_name_the_argument():
    x, weights, caches, step, heads = make_problem(2)
    with pytest.raises(ValueError, match="num_heads must be a positive int dividing D = 32"):
        decode_layers(x, weights, *caches, step, num_heads=5)
    with pytest.raises(ValueError, match=r"layers\[1\].qkv must have shape \[96, 32\]"):
        bad = weights[1]._replace(qkv=weights[1].qkv[:-1])
        decode_layers(x, [weights[0], bad], *caches, step, num_heads=heads)
    with pytest.raises(ValueError, match="step must be an int in"):
        decode_layers(x, weights, *caches, 99, num_heads=heads)
    with pytest.raises(TypeError, match="cross_lengths must be an int64 tensor"):
        decode_layers(x, weights, *caches[:4], caches[4].int(), step, num_heads=heads)
    with pytest.raises(ValueError, match="self_k must have shape"):
        decode_layers(x, weights, caches[0][:, :1], *caches[1:], step, num_heads=heads)
    with pytest.raises(TypeError, match=r"layers\[0\].self_norm_weight must be a tensor of x's dtype and device"):
        bad = weights[0]._replace(self_norm_weight=pack_decode_weight(weights[0].qkv, "bf16"))
        decode_layers(x, [bad, weights[1]], *caches, step, num_heads=heads)
    with pytest.raises(ValueError, match="backend must be one of"):
        decode_layers(x, weights, *caches, step, num_heads=heads, backend="sdpa")


@pytest.mark.parametrize("precision", [None, "int8"])
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpu_kernels), "reference"])
def test_prepared_layers_give_the_list_s_answer_exactly(precision, backend):
    """prepare_decode_layers checks and flattens once: the step on it is the step on the list, bit for bit, on each
    backend; an in-place change of a weight is seen (it holds the tensors themselves)."""
    problem = make_problem(3, seed=7)
    if precision is not None:
        problem = packed(problem, precision)
    x, weights, caches, step, heads = problem
    prepared = prepare_decode_layers(weights)
    assert isinstance(prepared, PreparedDecoderLayers) and len(prepared.tensors) == 12 * len(weights)
    assert (len(prepared.scales) == len(prepared.tensors)) == (precision == "int8")
    with torch.no_grad():
        assert decode_layers_backend(x, prepared) == decode_layers_backend(x, weights)
        for _ in range(2):  # the second time after an in-place change of a norm weight
            outs = [
                decode_layers(x, layers, *[c.clone() for c in caches], step, num_heads=heads, backend=backend)
                for layers in (weights, prepared)
            ]
            torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
            weights[1].mlp_norm_weight.mul_(1.5)


def test_prepared_layers_check_once_and_name_the_argument():
    x, weights, caches, step, heads = make_problem(2)
    with pytest.raises(ValueError, match=r"layers\[1\].qkv must have shape \[96, 32\]"):
        prepare_decode_layers([weights[0], weights[1]._replace(qkv=weights[1].qkv[:-1])])
    with pytest.raises(TypeError, match=r"layers\[1\].fc1 must be a tensor of the layers' dtype and device"):
        prepare_decode_layers([weights[0], weights[1]._replace(fc1=weights[1].fc1.double())])
    with pytest.raises(TypeError, match="layers must be a non-empty list of DecoderLayerWeights"):
        prepare_decode_layers([])
    prepared = prepare_decode_layers(weights)
    with pytest.raises(TypeError, match=r"x must be a torch.float32 tensor \[B, D=32\] on cpu \(the prepared lay"):
        decode_layers(torch.zeros(2, 16), prepared, *caches, step, num_heads=heads)
    with pytest.raises(TypeError, match=r"x must be a torch.float32 tensor \[B, D=32\]"):
        decode_layers(x.double(), prepared, *caches, step, num_heads=heads)
    with pytest.raises(ValueError, match="self_k must have shape"):  # the step's state is still checked every call
        decode_layers(x, prepared, caches[0][:1], *caches[1:], step, num_heads=heads)
    assert decode_layers_backend(x, prepared) == "cpp" or not _ext.available("cpu")
    weights[1].fc2.requires_grad_(True)  # unfrozen after the preparation: read at the call
    assert decode_layers_backend(x, prepared) == "reference"  # autograd: the spec is differentiable
    with torch.no_grad():
        assert decode_layers_backend(x, prepared) == decode_layers_backend(x, weights)


def test_public_names():
    assert mmdkernels.decode_layers is decode_layers and mmdkernels.decode_layers_ref is decode_layers_ref
    assert mmdkernels.prepare_decode_layers is prepare_decode_layers
