"""Reduced-precision self-attention caches (bfloat16 / float16 under float32 activations): decode_attention's C++
kernel and reference, the fused decode step (decode_layers / decode_logits), the model's cache (MusicLM.new_cache)
and generation.

Tolerances: a kernel reading a bfloat16 cache must agree with the float64 reference on the cache's own (rounded)
values at float32's level (the 2x rule of tests/tolerances.py with a float32 baseline on those values): it reads
the cache exactly and accumulates in float32. The model-level tests compare a bfloat16 cache with a float32 one:
their difference is the cache's rounding, bounded here loosely (it is measured, not assumed, in
benchmarks/quality_decode_weights.py and docs/decoding.md).
"""

import math

import pytest
import torch
from test_attention import LENGTH_KINDS, attention_in_dtype, make_problem, shape_id
from tolerances import assert_close_to_reference

import mmdkernels
from mmdkernels import _ext
from mmdkernels.attention import REDUCED_CACHE_DTYPES, _op_reasons, ops
from mmdkernels.attention.reference import decode_attention_ref
from models.lm import LMConfig, MusicLM, quantize_for_decode

# tests/test_attention.py's kinds of shape: one entry, odd sizes, grouped-query, a long (split) cache, Dh = 20
SHAPES = [(1, 1, 1, 1, 16), (2, 3, 3, 17, 64), (3, 5, 5, 129, 80), (4, 6, 2, 77, 64), (1, 3, 1, 1001, 64),
          (2, 2, 1, 41, 20)]  # fmt: skip
CACHE_IDS = {torch.bfloat16: "bf16-cache", torch.float16: "fp16-cache"}


def reduced_problem(shape, cache_dtype, lengths_kind="varying", seed=0):
    """A float32 q over caches of cache_dtype (NaN garbage past the lengths)."""
    q, k, v, lengths = make_problem(shape, torch.float32, lengths_kind, seed=seed)
    return q, k.to(cache_dtype), v.to(cache_dtype), lengths


def assert_matches_reduced_reference(out, q, k, v, lengths):
    """float32 output close to the float64 reference on the cache's values, at float32's level."""
    assert out.dtype == torch.float32 and out.shape == q.shape
    scale = 1.0 / math.sqrt(q.shape[2])
    expected = decode_attention_ref(q.double(), k.double(), v.double(), lengths, scale=scale)
    baseline = attention_in_dtype(q, k.float(), v.float(), lengths, scale)
    assert_close_to_reference(out, expected, baseline, name=f"decode attention over a {k.dtype} cache")


@pytest.mark.parametrize("lengths_kind", LENGTH_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("cache_dtype", REDUCED_CACHE_DTYPES, ids=CACHE_IDS.get)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_reduced_cache_matches_float64_reference(backend, cache_dtype, shape, lengths_kind):
    q, k, v, lengths = reduced_problem(shape, cache_dtype, lengths_kind)
    out = mmdkernels.decode_attention(q, k, v, lengths, backend=backend)
    assert torch.isfinite(out).all(), "NaN garbage past the lengths leaked into the output"
    assert_matches_reduced_reference(out, q, k, v, lengths)


@pytest.mark.parametrize("cache_dtype", REDUCED_CACHE_DTYPES, ids=CACHE_IDS.get)
def test_strided_reduced_cache_and_query_slice(cache_dtype):
    """A cache view of a bigger buffer (the model's [L, B, H, S, Dh] cache) and q sliced from a fused projection."""
    g = torch.Generator().manual_seed(5)
    buffer = torch.randn(3, 2, 4, 60, 32, generator=g).to(cache_dtype)  # [L, B, H, S_max, Dh]
    k, v = buffer[1], buffer[2]
    q = torch.randn(2, 3, 4, 32, generator=g)[:, 0]  # [B, H, Dh], batch stride 3 * H * Dh
    out = mmdkernels.decode_attention(q, k, v, 37, backend="cpp")
    assert_matches_reduced_reference(out, q, k, v, 37)


def test_automatic_choice_skips_sdpa_and_cuda_for_a_reduced_cache():
    q, k, v, lengths = reduced_problem((2, 4, 4, 20, 16), torch.bfloat16)
    assert mmdkernels.decode_attention(q, k, v, lengths).dtype == torch.float32  # the dispatcher's pick runs
    for backend in ("sdpa", "cuda"):
        assert any("must have q's dtype" in reason for reason in _op_reasons(q, k, lengths, backend)), backend
    assert _op_reasons(q, k, lengths, "cpp") == [] and _op_reasons(q, k, lengths, "triton") == []
    with pytest.raises(RuntimeError, match=r"backend 'sdpa' cannot run this input: k_cache / v_cache must have q's"):
        mmdkernels.decode_attention(q, k, v, lengths, backend="sdpa")


@pytest.mark.parametrize(
    "q_dtype, k_dtype, v_dtype, error, match",
    [
        (torch.float16, torch.bfloat16, torch.bfloat16, TypeError, r"k_cache must have q's dtype torch.float16 \(or"),
        (torch.bfloat16, torch.float32, torch.float32, TypeError, "k_cache must have q's dtype torch.bfloat16"),
        (torch.float32, torch.float64, torch.float64, TypeError, "k_cache must have q's dtype torch.float32"),
        (torch.float32, torch.bfloat16, torch.float16, TypeError, "v_cache must have k_cache's dtype torch.bfloat16"),
        (torch.float32, torch.float32, torch.bfloat16, TypeError, "v_cache must have k_cache's dtype torch.float32"),
    ],
)
def test_bad_cache_dtypes_raise(q_dtype, k_dtype, v_dtype, error, match):
    q, k, v, lengths = make_problem((2, 4, 2, 10, 8), torch.float32, "full")
    with pytest.raises(error, match=match):
        mmdkernels.decode_attention(q.to(q_dtype), k.to(k_dtype), v.to(v_dtype), lengths)


def test_compiled_op_checks_cache_dtypes():
    """The C++ op (callers that bypass the Python checks) accepts a reduced cache under float32 q only."""
    op = ops.decode_attention_op("cpp")
    q, k, v, lengths = make_problem((2, 4, 2, 10, 8), torch.float32, "full")
    assert op(q, k.bfloat16(), v.bfloat16(), lengths, 0.5).dtype == torch.float32
    with pytest.raises(RuntimeError, match=r"k_cache must have q's dtype Half \(or bfloat16 / float16 under a"):
        op(q.half(), k.bfloat16(), v.bfloat16(), lengths, 0.5)
    with pytest.raises(RuntimeError, match="v_cache must have k_cache's dtype BFloat16, got Half"):
        op(q, k.bfloat16(), v.half(), lengths, 0.5)


def test_opcheck_and_compile_with_a_reduced_cache():
    """The op's fake implementation (q's dtype out) and schema hold for mixed dtypes; torch.compile traces it."""
    q, k, v, lengths = reduced_problem((3, 4, 2, 300, 16), torch.bfloat16, seed=8)
    torch.library.opcheck(ops.decode_attention_op("cpp"), (q, k, v, lengths, 0.25))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: mmdkernels.decode_attention(*args, backend="cpp"), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, lengths), mmdkernels.decode_attention(q, k, v, lengths), rtol=0, atol=0)


# The fused decode step over a model's caches ---------------------------------------------------------------------


def small_model(precision: str = "fp32", **changes) -> MusicLM:
    torch.manual_seed(0)
    config = LMConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=128, codebook_size=32, num_codebooks=4, **changes)
    return quantize_for_decode(MusicLM(config).eval(), precision)


def decode_run(model, cache_dtype, steps, backend_env=None, monkeypatch=None, tensor_steps=False):
    """Logits [steps, B, R, C] of `steps` greedy-free decode steps (fixed tokens) and the final cache."""
    if backend_env is not None:
        monkeypatch.setenv("MMDKERNELS_BACKEND_DECODE_LAYERS", backend_env)
        monkeypatch.setenv("MMDKERNELS_BACKEND_DECODE_LOGITS", backend_env)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.codebook_size, (steps, 3, model.streams), generator=g)
    with torch.inference_mode():
        cache = model.new_cache(model.encode_condition(["a", "bb", None]), steps + 2, dtype=cache_dtype)
        logits = [
            model.decode_step(tokens[s], torch.tensor([s]) if tensor_steps else s, cache) for s in range(steps)
        ]
    return torch.stack(logits), cache


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("cache_dtype", REDUCED_CACHE_DTYPES, ids=CACHE_IDS.get)
def test_fused_step_matches_per_layer_path(monkeypatch, precision, cache_dtype):
    """The C++ step (tokens to logits, the cache written in C++) against the per-layer Python path (the cache written
    by tensor assignment, attention by decode_attention): the same bf16 cache contents, logits close."""
    model = small_model(precision)
    fused, fused_cache = decode_run(model, cache_dtype, 12)
    with monkeypatch.context() as m:
        layered, layered_cache = decode_run(model, cache_dtype, 12, "reference", m)
    assert fused_cache.self_k.dtype == cache_dtype
    for a, b in ((fused_cache.self_k, layered_cache.self_k), (fused_cache.self_v, layered_cache.self_v)):
        # the same float32 K/V up to the projections' summation order, then rounded: at most one unit of the
        # cache's last place apart (2^-7 relative for bfloat16, 2^-10 for float16)
        ulp = 2.0**-7 if cache_dtype == torch.bfloat16 else 2.0**-10
        torch.testing.assert_close(a.float(), b.float(), rtol=ulp, atol=1e-5)
    torch.testing.assert_close(fused, layered, rtol=2e-3, atol=2e-3)


def test_fused_step_reads_its_cache_dtype(monkeypatch):
    """A bfloat16 cache changes what the fused step reads: its logits equal the per-layer path's over the same
    rounded cache, and differ from a float32 cache's only by that rounding."""
    model = small_model()
    reduced, _ = decode_run(model, torch.bfloat16, 10)
    exact, _ = decode_run(model, None, 10)
    with monkeypatch.context() as m:
        reference, _ = decode_run(model, torch.bfloat16, 10, "reference", m)
    torch.testing.assert_close(reduced, reference, rtol=2e-3, atol=2e-3)
    difference = (reduced - exact).abs().max().item()
    assert 0 < difference < 0.05 * exact.abs().max().item(), difference


def test_tensor_step_and_prefill_read_a_reduced_cache(monkeypatch):
    """The fixed-shape step (step as a tensor: the CUDA-graph path) and a multi-token prefill write and read a
    bfloat16 cache like the int step. The fixed-shape step's attention reads the cache as stored, through
    decode_attention with the lengths as a tensor (no float32 copy of the cache, no length read on the host)."""
    import models.lm as lm

    model = small_model()
    by_int, int_cache = decode_run(model, torch.bfloat16, 6)
    seen, original = [], mmdkernels.decode_attention

    def spy(q, k_cache, v_cache, lengths, **kwargs):
        seen.append((k_cache.dtype, v_cache.dtype, type(lengths)))
        return original(q, k_cache, v_cache, lengths, **kwargs)

    monkeypatch.setattr(lm.mmdkernels, "decode_attention", spy)
    by_tensor, tensor_cache = decode_run(model, torch.bfloat16, 6, tensor_steps=True)
    monkeypatch.undo()
    self_attention = [s for s in seen if s[0] == torch.bfloat16]
    assert len(self_attention) == 6 * model.config.num_layers, seen  # every layer of every step
    assert all(s == (torch.bfloat16, torch.bfloat16, torch.Tensor) for s in self_attention)
    torch.testing.assert_close(by_tensor, by_int, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(tensor_cache.self_k.float(), int_cache.self_k.float(), rtol=2.0**-7, atol=1e-5)
    layer = model.layers[0].self_attn
    x = torch.randn(3, 5, model.config.dim, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        caches = {d: torch.zeros(2, 3, 4, 9, 16, dtype=d) for d in (torch.float32, torch.bfloat16)}
        outs = {d: layer(x, caches[d][0], caches[d][1], 0) for d in caches}
    assert outs[torch.bfloat16].dtype == torch.float32
    torch.testing.assert_close(caches[torch.bfloat16].float(), caches[torch.float32], rtol=2.0**-7, atol=0)
    torch.testing.assert_close(outs[torch.bfloat16], outs[torch.float32], rtol=0.02, atol=0.02)


def test_decode_layers_checks_reduced_caches():
    model = small_model()
    with torch.inference_mode():
        cache = model.new_cache(model.encode_condition(["a"]), 4, dtype=torch.bfloat16)
        x = torch.randn(1, model.config.dim)
        prepared = model.prepared_decode_layers()
        args = (cache.self_k, cache.self_v, cache.cross_k, cache.cross_v, cache.cross_lengths, 0)
        out = mmdkernels.decode_layers(x, prepared, *args, num_heads=4, backend="cpp")
        assert out.dtype == torch.float32 and cache.self_k[:, :, :, 0].abs().sum() > 0
        # the spec (decode_layers_ref) over a copy of the cache: the same written row, the same output
        spec_cache = [c.clone() for c in args[:2]]
        spec_cache[0][:, :, :, 0] = 0
        spec_cache[1][:, :, :, 0] = 0
        spec = mmdkernels.decode_layers(x, prepared, *spec_cache, *args[2:], num_heads=4, backend="reference")
        torch.testing.assert_close(spec, out, rtol=1e-4, atol=1e-4)
        for written, expected in zip(spec_cache, args[:2]):
            torch.testing.assert_close(written.float(), expected.float(), rtol=2.0**-7, atol=1e-6)
        with pytest.raises(TypeError, match="self_v must have self_k's dtype torch.bfloat16"):
            mmdkernels.decode_layers(x, prepared, cache.self_k, cache.self_v.half(), *args[2:], num_heads=4)
        with pytest.raises(TypeError, match=r"cross_k must be a tensor of x's dtype and device \(torch.float32"):
            mmdkernels.decode_layers(x, prepared, *args[:2], cache.cross_k.bfloat16(), *args[3:], num_heads=4)
        op = torch.ops.mmdkernels.lm_decode_layers
        with pytest.raises(RuntimeError, match="self_v must have self_k's dtype BFloat16"):
            op(x, list(prepared.tensors), [], cache.self_k, cache.self_v.half(), *args[2:], 4, 1e-5, False)
        with pytest.raises(RuntimeError, match="self_k / self_v must be float32, bfloat16 or float16, got Double"):
            op(x, list(prepared.tensors), [], cache.self_k.double(), cache.self_v.double(), *args[2:], 4, 1e-5, False)


def test_new_cache_dtype_rules():
    model = small_model()
    condition = model.encode_condition(["a", None])
    assert model.new_cache(condition, 3).self_k.dtype == torch.float32
    cache = model.new_cache(condition, 3, dtype=torch.bfloat16)
    assert cache.self_k.dtype == cache.self_v.dtype == torch.bfloat16 and cache.cross_k.dtype == torch.float32
    assert model.new_cache(condition, 3, dtype=torch.float32).self_k.dtype == torch.float32
    for bad in (torch.float64, torch.int8):
        with pytest.raises(ValueError, match="dtype must be None, the model's torch.float32, or bfloat16 / float16"):
            model.new_cache(condition, 3, dtype=bad)
    half_model = small_model().to(torch.bfloat16)
    with pytest.raises(ValueError, match="or bfloat16 / float16 under a float32 model, got torch.float16"):
        half_model.new_cache(half_model.encode_condition(["a"]), 3, dtype=torch.float16)


def test_generate_with_a_bfloat16_cache_is_reproducible():
    from models.generate import generate

    model = small_model("int8")
    runs = [
        generate(model, ["a", None], 0.2, cfg_coef=2.0, cache_dtype=torch.bfloat16,
                 generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]  # fmt: skip
    assert runs[0].shape == (2, 4, 10) and torch.equal(runs[0], runs[1])
    assert int(runs[0].min()) >= 0 and int(runs[0].max()) < model.config.codebook_size


@pytest.mark.parametrize("pattern", ["delay", "flatten"])
def test_quality_script_decoded_nll_is_the_teacher_forced_nll(pattern):
    """benchmarks/quality_decode_weights.py's decoded NLL per row, on a float32 cache, equals the teacher-forced NLL
    (models.lm.code_log_likelihoods: the whole sequence in one forward pass), the answer known here; a bfloat16 cache
    moves it by its rounding only."""
    from benchmarks.quality_decode_weights import decode_logits, decoded_nll_per_row
    from models.lm import code_log_likelihoods

    model = small_model(pattern=pattern)
    codes = torch.randint(0, model.config.codebook_size, (3, 4, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = -code_log_likelihoods(model, codes, model.encode_condition([None] * 3)).double().sum((1, 2)) / 9
        exact = torch.tensor(decoded_nll_per_row(model, decode_logits(model, codes), codes), dtype=torch.float64)
        rounded = decoded_nll_per_row(model, decode_logits(model, codes, torch.bfloat16), codes)
    torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-5)
    difference = (torch.tensor(rounded, dtype=torch.float64) - expected).abs().max().item()
    assert 0 < difference < 0.01 * expected.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.skipif(not _ext.triton_installed(), reason="the captured step's attention is Triton's on a GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_step_over_a_bfloat16_cache(precision):
    """The captured step (models.generate.GraphedStep: the step as a device tensor) over a bfloat16 cache against the
    eager int step over another: the same logits within the rounding of the two paths' sums, the same cache within
    one bfloat16 rounding."""
    from models.generate import GraphedStep

    model = quantize_for_decode(small_model().cuda(), precision)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, model.config.codebook_size, (7, 3, model.streams), generator=g).cuda()
    with torch.inference_mode():
        condition = model.encode_condition(["a", "bb", None])
        eager_cache, graph_cache = (model.new_cache(condition, 9, dtype=torch.bfloat16) for _ in "ab")
        graphed = GraphedStep(model, graph_cache, 3)
        for s in range(tokens.shape[0]):
            eager = model.decode_step(tokens[s], s, eager_cache)
            replayed = graphed(tokens[s], s)
            torch.testing.assert_close(replayed, eager, rtol=2e-3, atol=2e-3)
    for graph, eager in ((graph_cache.self_k, eager_cache.self_k), (graph_cache.self_v, eager_cache.self_v)):
        torch.testing.assert_close(graph[..., :7, :].float(), eager[..., :7, :].float(), rtol=2.0**-7, atol=1e-5)
