"""mmdkernels.decode_logits: a whole decode step, tokens to logits, in one compiled CPU call (the embedding sum, the
layers, the final norm, the heads) against its spec decode_logits_ref in float64; the backend choice, opcheck and
clear errors. The layers themselves: tests/test_decode_layers.py."""

import pytest
import torch
from test_decode_layers import as64, make_problem, packed
from tolerances import assert_close_to_reference

import mmdkernels
from mmdkernels import _ext
from mmdkernels.decode import (
    DecoderEnds,
    decode_logits,
    decode_logits_backend,
    decode_logits_ref,
    prepare_decode_layers,
)
from mmdkernels.decode import ops as decode_ops
from mmdkernels.linear import QuantizedLinearWeight, pack_decode_weight

needs_cpu_kernels = pytest.mark.skipif(not _ext.available("cpu"), reason="no compiled CPU library")


def make_step(batch, streams=3, table_rows=7, head_rows=40, step=4, seed=0, head_precision=None, **problem_kwargs):
    """A decode_layers problem plus tokens [B, R], a position [D] and the ends (R tables of table_rows rows)."""
    x, weights, caches, step, heads = make_problem(batch, step=step, seed=seed, **problem_kwargs)
    dim = x.shape[1]
    g = torch.Generator().manual_seed(seed + 1)
    ends = DecoderEnds(
        embedding=torch.randn(streams * table_rows, dim, generator=g),
        offsets=torch.arange(streams) * table_rows,
        final_norm_weight=1 + 0.1 * torch.randn(dim, generator=g),
        final_norm_bias=0.1 * torch.randn(dim, generator=g),
        head=torch.randn(head_rows, dim, generator=g) * dim**-0.5,
    )
    if head_precision is not None:
        ends = ends._replace(head=pack_decode_weight(ends.head, head_precision))
    tokens = torch.randint(0, table_rows, (batch, streams), generator=g)
    position = torch.randn(dim, generator=g)
    return tokens, position, ends, weights, caches, step, heads


def ends64(ends: DecoderEnds) -> DecoderEnds:
    return DecoderEnds(*(t if isinstance(t, QuantizedLinearWeight) or not t.is_floating_point() else t.double()
                         for t in ends))  # fmt: skip


def run(case, backend, layers_precision=None, float64=False):
    tokens, position, ends, weights, caches, step, heads = case
    problem = (position[None], weights, caches, step, heads)
    if layers_precision is not None:
        problem = packed(problem, layers_precision)
    if float64:
        problem = as64(problem)
        position, ends = position.double(), ends64(ends)
    _, weights, caches, step, heads = problem
    caches = [c.clone() for c in caches]
    with torch.no_grad():
        out = decode_logits(tokens, position, ends, weights, *caches, step, num_heads=heads, backend=backend)
    return out, caches[0], caches[1]


def assert_logits_match_spec(case, name, layers_precision=None):
    """The compiled step's logits and K/V caches against the float64 reference, the float32 reference as the baseline
    (tests/tolerances.py); packed weights mean their dequantised values in both."""
    ref = run(case, "reference", layers_precision, float64=True)
    base = run(case, "reference", layers_precision)
    out = run(case, "cpp", layers_precision)
    assert out[0].dtype == torch.float32 and out[0].shape == (case[0].shape[0], case[2].head.shape[0])
    for what, a, r, b in zip(("logits", "K cache", "V cache"), out, ref, base):
        assert_close_to_reference(a, r, b, name=f"{name} {what}")


@needs_cpu_kernels
@pytest.mark.parametrize("batch", [1, 2, 5, 16])
@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("step", [0, 8])
def test_compiled_step_matches_the_spec(batch, streams, step):
    case = make_step(batch, streams=streams, step=step, seed=batch * 10 + streams + step)
    assert_logits_match_spec(case, f"decode_logits B={batch} R={streams} step={step}")


@needs_cpu_kernels
@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_compiled_step_with_packed_layers_and_head_matches_the_spec(precision, batch):
    case = make_step(batch, head_rows=33, seed=batch + 200, head_precision=precision)
    assert_logits_match_spec(case, f"decode_logits {precision}", layers_precision=precision)


@needs_cpu_kernels
def test_embedding_rows_and_order():
    """The embedding sum takes row tokens[b, r] + offsets[r] of each stream (the step's K cache is a function of the
    embeddings alone: a wrong row shows there first), with the offsets not a multiple of anything."""
    case = make_step(3, streams=3, table_rows=5, seed=3)
    tokens, position, ends, *rest = case
    ends = ends._replace(offsets=torch.tensor([4, 0, 9]))
    tokens = torch.tensor([[0, 4, 5], [1, 0, 0], [10, 12, 1]])
    assert_logits_match_spec((tokens, position, ends, *rest), "decode_logits rows")


@needs_cpu_kernels
def test_same_answer_from_the_layers_op_then_the_ends():
    """decode_logits = decode_layers + final norm + head: the K/V caches it writes are decode_layers' bit for bit
    (the same embeddings and layers), the logits within float32 rounding of the final norm."""
    tokens, position, ends, weights, caches, step, heads = make_step(4, seed=5)
    x = ends.embedding[tokens + ends.offsets].sum(1) + position
    c1, c2 = [c.clone() for c in caches], [c.clone() for c in caches]
    with torch.no_grad():
        h = mmdkernels.decode_layers(x, weights, *c1, step, num_heads=heads, backend="cpp")
        expected = torch.nn.functional.layer_norm(h, (h.shape[1],), ends.final_norm_weight, ends.final_norm_bias)
        expected = expected @ ends.head.t()
        logits = decode_logits(tokens, position, ends, weights, *c2, step, num_heads=heads, backend="cpp")
    torch.testing.assert_close(c2[0], c1[0], rtol=0, atol=0)
    torch.testing.assert_close(c2[1], c1[1], rtol=0, atol=0)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@needs_cpu_kernels
def test_automatic_choice(monkeypatch):
    tokens, position, ends, weights, *_ = make_step(3)
    prepared = prepare_decode_layers(weights)
    with torch.no_grad():
        assert decode_logits_backend(tokens, position, ends, prepared) == "cpp"
        many = torch.zeros(17, tokens.shape[1], dtype=torch.long)
        assert decode_logits_backend(many, position, ends, prepared) == "reference"  # > 16 rows
        monkeypatch.setenv("MMDKERNELS_BACKEND_DECODE_LAYERS", "reference")  # the per-layer path: the whole step too
        assert decode_logits_backend(tokens, position, ends, prepared) == "reference"
        monkeypatch.setenv("MMDKERNELS_BACKEND_DECODE_LOGITS", "cpp")  # unless the step's own variable says
        assert decode_logits_backend(tokens, position, ends, prepared) == "cpp"
    monkeypatch.delenv("MMDKERNELS_BACKEND_DECODE_LOGITS")
    monkeypatch.delenv("MMDKERNELS_BACKEND_DECODE_LAYERS")
    ends.head.requires_grad_(True)
    assert decode_logits_backend(tokens, position, ends, prepared) == "reference"  # autograd: the spec
    with torch.no_grad():
        assert decode_logits_backend(tokens, position, ends, prepared) == "cpp"
        bad = ends._replace(head=torch.randn(ends.head.shape[1], 40).t())
        assert decode_logits_backend(tokens, position, bad, prepared) == "reference"  # a non-contiguous head
        with pytest.raises(RuntimeError, match="cannot run this input: .*not contiguous"):
            run((tokens, position, bad, weights, *make_step(3)[4:]), "cpp")
        strided = torch.randn(position.shape[0], 2)[:, 0]
        assert decode_logits_backend(tokens, strided, ends, prepared) == "reference"


def op_args(case):
    tokens, position, ends, weights, caches, step, heads = case
    pairs = [(t.data, t.scale) if isinstance(t, QuantizedLinearWeight) else (t, None) for w in weights for t in w]
    quantized = isinstance(ends.head, QuantizedLinearWeight)
    head, scale = (ends.head.data, ends.head.scale) if quantized else (ends.head, None)
    return [tokens, position, ends.embedding, ends.offsets, ends.final_norm_weight, ends.final_norm_bias, head, scale,
            [t for t, _ in pairs], [s for _, s in pairs], *caches, step, heads, 1e-5, False]  # fmt: skip


@needs_cpu_kernels
@pytest.mark.parametrize("precision", [None, "int8"])
def test_opcheck(precision):
    tokens, position, ends, weights, caches, step, heads = make_step(3, head_precision=precision)
    if precision is not None:
        _, weights, *_ = packed((position[None], weights, caches, step, heads), precision)
    args = op_args((tokens, position, ends, weights, caches, step, heads))
    torch.library.opcheck(decode_ops.decode_logits_op(), args)


@needs_cpu_kernels
def test_compiled_op_checks_its_arguments():
    case = make_step(2, streams=2, table_rows=5)
    args = op_args(case)
    op = decode_ops.decode_logits_op()

    def call(**changes):
        names = ["tokens", "position", "embedding", "offsets", "norm_weight", "norm_bias", "head", "head_scale"]
        new = list(args)
        for name, value in changes.items():
            new[names.index(name)] = value
        with torch.no_grad():
            op(*new)

    with pytest.raises(RuntimeError, match=r"tokens\[1, 0\] \+ offsets\[0\] = 10 is outside the embedding's 10 rows"):
        call(tokens=torch.tensor([[0, 0], [10, 0]]))
    with pytest.raises(RuntimeError, match=r"tokens\[0, 1\] \+ offsets\[1\] = -1 is outside"):
        call(tokens=torch.tensor([[0, -6], [0, 0]]))
    with pytest.raises(RuntimeError, match="tokens must have dtype Long"):
        call(tokens=args[0].int())
    with pytest.raises(RuntimeError, match=r"offsets must have shape \[R = 2\]"):
        call(offsets=torch.tensor([0, 5, 10]))
    with pytest.raises(RuntimeError, match=r"position must be a float32 tensor \[D = 32\]"):
        call(position=torch.zeros(31))
    with pytest.raises(RuntimeError, match="embedding must have dtype Float"):
        call(embedding=args[2].double())
    with pytest.raises(RuntimeError, match=r"final_norm_weight / final_norm_bias must be contiguous float32"):
        call(norm_bias=torch.zeros(31))
    with pytest.raises(RuntimeError, match=r"head must be a contiguous tensor \[C, D = 32\]"):
        call(head=torch.zeros(40, 31))
    with pytest.raises(RuntimeError, match="a scale belongs to int8 weights only"):
        call(head_scale=torch.ones(40))


def test_wrapper_errors_name_the_argument():
    tokens, position, ends, weights, caches, step, heads = make_step(2, streams=2, table_rows=5)

    def call(tokens=tokens, position=position, ends=ends, step=step, backend=None):
        with torch.no_grad():
            decode_logits(tokens, position, ends, weights, *caches, step, num_heads=heads, backend=backend)

    with pytest.raises(TypeError, match=r"tokens must be an int64 tensor \[B, R\]"):
        call(tokens=tokens.float())
    with pytest.raises(ValueError, match=r"position must have shape \[32\]"):
        call(position=torch.zeros(1, 32))
    with pytest.raises(TypeError, match="position must be a tensor of the layers' dtype and device"):
        call(position=position.double())
    with pytest.raises(ValueError, match=r"ends.offsets must have shape \[R=2\]"):
        call(ends=ends._replace(offsets=torch.tensor([0])))
    with pytest.raises(ValueError, match=r"ends.head must have shape \[C, D=32\]"):
        call(ends=ends._replace(head=torch.zeros(40, 16)))
    with pytest.raises(ValueError, match=r"ends.embedding must have shape \[V, D=32\]"):
        call(ends=ends._replace(embedding=torch.zeros(10, 16)))
    with pytest.raises(TypeError, match="ends must be a DecoderEnds"):
        call(ends=tuple(ends))
    with pytest.raises(ValueError, match="step must be an int in"):
        call(step=99)
    with pytest.raises(ValueError, match="tokens \\+ ends.offsets must index the embedding's 10 rows"):
        call(tokens=torch.tensor([[0, 0], [0, 5]]), backend="reference")


def test_reference_is_the_layers_reference_between_the_ends():
    """decode_logits_ref in float64: the embedding sum, decode_layers_ref, LayerNorm, the head, spelled out."""
    tokens, position, ends, weights, caches, step, heads = make_step(3, seed=11)
    _, weights, caches, step, heads = as64((position[None], weights, caches, step, heads))
    position, ends = position.double(), ends64(ends)
    c1, c2 = [c.clone() for c in caches], [c.clone() for c in caches]
    logits = decode_logits_ref(tokens, position, ends, weights, *c1, step, heads)
    x = sum(ends.embedding[tokens[:, r] + ends.offsets[r]] for r in range(tokens.shape[1])) + position
    h = mmdkernels.decode_layers_ref(x, weights, *c2, step, heads)
    mean, var = h.mean(1, keepdim=True), h.var(1, unbiased=False, keepdim=True)
    expected = ((h - mean) / torch.sqrt(var + 1e-5) * ends.final_norm_weight + ends.final_norm_bias) @ ends.head.t()
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)


def test_public_names():
    assert mmdkernels.decode_logits is decode_logits and mmdkernels.decode_logits_ref is decode_logits_ref
    assert mmdkernels.DecoderEnds is DecoderEnds and mmdkernels.decode_logits_backend is decode_logits_backend
