"""KV-cached decode attention through the public API: the C++ and SDPA backends against the float64 reference,
strided caches, garbage past the lengths, grouped-query attention, bad input, opcheck and torch.compile.

Tolerance: the rule of tests/tolerances.py (flash-attention's): a backend's max error against the float64 reference
may be at most twice the error of the same maths done by plain PyTorch in the input dtype (scores, softmax and
weighted sum all in that dtype), plus the table's floor for that dtype.
"""

import math
import types

import pytest
import torch
from tolerances import assert_close_to_reference

import mmdkernels
from mmdkernels import _dispatch
from mmdkernels.attention import ops
from mmdkernels.attention.reference import decode_attention_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (B, H, H_kv, S_max, Dh): B = 1 and 5, odd H, Dh in 16, 64, 80, 128 and 20 (not a whole number of 8- or 16-lane
# vectors: the kernels' column tails), odd S_max, grouped-query (H_kv < H), and a long cache with one (sequence, head)
# pair, which the C++ kernel splits into key ranges (flash-decoding) and combines.
SHAPES = [
    (1, 1, 1, 1, 16),
    (2, 3, 3, 17, 64),
    (3, 5, 5, 129, 80),
    (5, 7, 7, 33, 128),
    (4, 6, 2, 77, 64),
    (2, 9, 3, 301, 16),
    (1, 3, 1, 1001, 64),
    (2, 2, 1, 41, 20),
]
LENGTH_KINDS = ("one", "full", "varying", "int")


def shape_id(shape) -> str:
    return "B{}-H{}-Hkv{}-S{}-D{}".format(*shape)


def make_lengths(kind: str, batch: int, max_len: int, generator: torch.Generator) -> int | torch.Tensor:
    if kind == "one":
        return torch.ones(batch, dtype=torch.int64)
    if kind == "full":
        return torch.full((batch,), max_len, dtype=torch.int64)
    if kind == "varying":
        return torch.randint(1, max_len + 1, (batch,), generator=generator)
    return int(torch.randint(1, max_len + 1, (1,), generator=generator))


def make_problem(shape, dtype, lengths_kind="varying", seed=0, garbage=float("nan")):
    """q [B, H, Dh] and caches [B, H_kv, S_max, Dh] in dtype, lengths; cache entries past each length hold garbage."""
    batch, heads, kv_heads, max_len, dim = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, max_len, dim, generator=g).to(dtype)
    lengths = make_lengths(lengths_kind, batch, max_len, g)
    fill_past_lengths(k, lengths, garbage)
    fill_past_lengths(v, lengths, garbage)
    return q, k, v, lengths


def fill_past_lengths(cache: torch.Tensor, lengths, value: float) -> None:
    per_sequence = lengths.tolist() if isinstance(lengths, torch.Tensor) else [lengths] * cache.shape[0]
    for b, length in enumerate(per_sequence):
        cache[b, :, length:] = value


def attention_in_dtype(q, k, v, lengths, scale):
    """Plain PyTorch decode attention with every step in the inputs' dtype (the error baseline of the 2x rule)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    per_sequence = lengths.tolist() if isinstance(lengths, torch.Tensor) else [lengths] * q.shape[0]
    out = []
    for b, length in enumerate(per_sequence):
        scores = torch.einsum("hd,hsd->hs", q[b], k[b, :, :length]) * scale
        out.append(torch.einsum("hs,hsd->hd", torch.softmax(scores, dim=-1), v[b, :, :length]))
    return torch.stack(out)


def assert_matches_reference(out, q, k, v, lengths, scale=None):
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    expected = decode_attention_ref(q.double(), k.double(), v.double(), lengths, scale=scale)
    baseline = attention_in_dtype(q, k, v, lengths, scale)
    assert_close_to_reference(out, expected, baseline, name=f"decode attention, {q.dtype}")


@pytest.mark.parametrize("lengths_kind", LENGTH_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_matches_float64_reference(dtype, shape, lengths_kind):
    q, k, v, lengths = make_problem(shape, dtype, lengths_kind)
    out = mmdkernels.decode_attention(q, k, v, lengths, backend="cpp")
    assert torch.isfinite(out).all(), "NaN garbage past the lengths leaked into the output"
    assert_matches_reference(out, q, k, v, lengths)


@pytest.mark.parametrize("lengths_kind", LENGTH_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_sdpa_matches_float64_reference(shape, lengths_kind):
    """The slicing around torch's SDPA (its dtypes are covered by test_strided_cache_views)."""
    q, k, v, lengths = make_problem(shape, torch.float32, lengths_kind)
    out = mmdkernels.decode_attention(q, k, v, lengths, backend="sdpa")
    assert torch.isfinite(out).all(), "NaN garbage past the lengths leaked into the output"
    assert_matches_reference(out, q, k, v, lengths)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_online_softmax_across_key_blocks(dtype):
    """Ranges longer than the C++ kernel's block of keys (1024; one thread and 12 (sequence, head) pairs, so no
    split): the running max and sum carried from block to block, with scores that grow along the cache so that every
    block raises the max and rescales the earlier ones."""
    q, k, v, _ = make_problem((3, 4, 4, 3100, 24), dtype, "full", seed=7)
    growth = torch.linspace(0.2, 2.0, 3100)[None, None, :, None]
    k = (k.float() * growth + q.float().mean(1, keepdim=True)[:, :, None] * growth).to(dtype)
    lengths = torch.tensor([3100, 1025, 2049])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = mmdkernels.decode_attention(q, k, v, lengths, backend="cpp")
    finally:
        torch.set_num_threads(before)
    assert_matches_reference(out, q, k, v, lengths)


def test_reference_matches_a_loop_over_sequences_and_heads():
    """The spec itself, against the definition written out per (sequence, head) with the cache sliced to length."""
    q, k, v, lengths = make_problem((3, 6, 2, 40, 16), torch.float64)
    out = decode_attention_ref(q, k, v, lengths, scale=0.3)
    for b in range(3):
        for h in range(6):
            keys, values = k[b, h // 3, : lengths[b]], v[b, h // 3, : lengths[b]]
            weights = torch.softmax(keys @ q[b, h] * 0.3, dim=0)
            assert_close_to_reference(out[b, h], weights @ values, name="float64 reference vs the loop")


def strided_views(shape, dtype, layout: str, seed=1):
    """Caches that are views of bigger preallocated buffers, as a static KV cache is."""
    batch, heads, kv_heads, max_len, dim = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "slice":  # [B, H_kv, S_big, Dh + pad] buffer, sliced on S and Dh
        k_buf = torch.randn(batch, kv_heads, max_len + 9, dim + 8, generator=g).to(dtype)
        v_buf = torch.randn(batch, kv_heads, max_len + 9, dim + 8, generator=g).to(dtype)
        k, v = k_buf[:, :, :max_len, :dim], v_buf[:, :, :max_len, :dim]
    elif layout == "bshd":  # [B, S, H_kv, Dh] buffer seen as [B, H_kv, S, Dh]
        k = torch.randn(batch, max_len, kv_heads, dim, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(batch, max_len, kv_heads, dim, generator=g).to(dtype).transpose(1, 2)
    else:  # "feature-major": Dh not contiguous
        k = torch.randn(batch, kv_heads, dim, max_len, generator=g).to(dtype).transpose(2, 3)
        v = torch.randn(batch, kv_heads, dim, max_len, generator=g).to(dtype).transpose(2, 3)
    q = torch.randn(batch, dim, heads, generator=g).to(dtype).transpose(1, 2)  # non-contiguous query too
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    fill_past_lengths(k, lengths, float("nan"))
    fill_past_lengths(v, lengths, float("nan"))
    assert not (k.is_contiguous() or v.is_contiguous() or q.is_contiguous())
    return q, k, v, lengths


@pytest.mark.parametrize("layout", ["slice", "bshd", "feature-major"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["cpp", "sdpa", "reference"])
def test_strided_cache_views(backend, dtype, layout):
    q, k, v, lengths = strided_views((3, 4, 2, 45, 64), dtype, layout)
    out = mmdkernels.decode_attention(q, k, v, lengths, backend=backend)
    assert_matches_reference(out, q, k, v, lengths)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_query_slice_of_a_fused_projection(backend, dtype):
    """q as a decode step has it: the q part of a fused QKV output [B, 3, H, Dh], heads packed, rows 3 H Dh apart (the
    C++ op reads float32 ones in place); also one query row broadcast over the batch (batch stride 0)."""
    _, k, v, lengths = make_problem((3, 4, 4, 30, 16), dtype, "varying", seed=8)
    fused = torch.randn(3, 3, 4, 16, generator=torch.Generator().manual_seed(9)).to(dtype)
    q = fused[:, 0]
    assert not q.is_contiguous() and q.stride(1) == 16
    out = mmdkernels.decode_attention(q, k, v, lengths, backend=backend)
    assert_matches_reference(out, q, k, v, lengths)
    torch.testing.assert_close(out, mmdkernels.decode_attention(q.contiguous(), k, v, lengths, backend=backend))
    one = fused[:1, 1].expand(3, 4, 16)
    assert_matches_reference(mmdkernels.decode_attention(one, k, v, lengths, backend=backend), one, k, v, lengths)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e4])
@pytest.mark.parametrize("backend", ["cpp", "sdpa", "reference"])
def test_entries_past_the_length_are_never_used(backend, garbage):
    """Whatever sits past a sequence's length (an off-by-one would pick up a huge score or a NaN) changes nothing."""
    q, k, v, lengths = make_problem((3, 4, 4, 50, 16), torch.float32, "varying", seed=3, garbage=garbage)
    clean_k, clean_v = k.clone(), v.clone()
    fill_past_lengths(clean_k, lengths, 0.0)
    fill_past_lengths(clean_v, lengths, 0.0)
    out = mmdkernels.decode_attention(q, k, v, lengths, backend=backend)
    torch.testing.assert_close(out, mmdkernels.decode_attention(q, clean_k, clean_v, lengths, backend=backend))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["cpp", "sdpa", "reference"])
def test_scale_and_int_lengths(backend):
    q, k, v, _ = make_problem((2, 3, 3, 20, 16), torch.float32, "full", seed=4)
    default = mmdkernels.decode_attention(q, k, v, 13, backend=backend)
    explicit = mmdkernels.decode_attention(q, k, v, torch.tensor([13, 13]), scale=0.25, backend=backend)
    torch.testing.assert_close(default, explicit)  # Dh = 16: the default scale is 1/4
    custom = mmdkernels.decode_attention(q, k, v, 13, scale=0.9, backend=backend)
    assert_matches_reference(custom, q, k, v, 13, scale=0.9)
    assert not torch.allclose(custom, default, atol=1e-3)


def test_automatic_choice_and_float64():
    q, k, v, lengths = make_problem((2, 4, 4, 30, 16), torch.float32, seed=5)
    assert_matches_reference(mmdkernels.decode_attention(q, k, v, lengths), q, k, v, lengths)
    q, k, v = q.double(), k.double(), v.double()
    torch.testing.assert_close(mmdkernels.decode_attention(q, k, v, lengths), decode_attention_ref(q, k, v, lengths))


@pytest.mark.parametrize("bf16_dot", [True, False])
@pytest.mark.parametrize(
    "dtype, lengths, expected",
    [
        (torch.float32, 10, "cpp"),
        (torch.float16, 10, "cpp"),
        (torch.bfloat16, 10, None),  # SDPA where the CPU has bf16 dot products (measured faster there), else C++
        (torch.float64, 10, "reference"),
    ],
)
def test_automatic_choice_on_cpu(monkeypatch, bf16_dot, dtype, lengths, expected):
    monkeypatch.setattr(_dispatch, "SDPA_FASTER_ON_CPU", (torch.bfloat16,) if bf16_dot else ())
    if expected is None:
        expected = "sdpa" if bf16_dot else "cpp"
    q = torch.randn(2, 4, 16).to(dtype)
    assert _dispatch.choose_backend(q, None, "decode_attention") == expected


def test_sdpa_first_for_bf16_only_with_bf16_dot_products():
    """The import-time rule follows what torch reports about this CPU (AVX512-BF16 or AMX tiles)."""
    has = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert _dispatch.SDPA_FASTER_ON_CPU == ((torch.bfloat16,) if has else ())


@pytest.mark.parametrize(
    "dtype, batch, heads, expected",
    [
        (torch.bfloat16, 4, 16, "cuda"),  # 64 rows: the CUDA kernel measured faster on an H200
        (torch.float16, 1, 8, "cuda"),
        (torch.bfloat16, 8, 16, "sdpa"),  # 128 rows: SDPA measured faster
        (torch.float32, 1, 8, "sdpa"),  # not measured: SDPA first
        (torch.float64, 1, 8, "reference"),
    ],
)
def test_automatic_order_on_cuda(dtype, batch, heads, expected):
    """The measured CUDA rule (mmdkernels/_dispatch.py), read without a GPU: the first provider tried."""
    q = types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(batch, heads, 64))
    assert _dispatch.OPS["decode_attention"].priority(q)[0] == expected


def test_cuda_head_size_limit_is_a_reason():
    """Dh > 256 rules the CUDA kernel out in Python (backend="cuda" raises with this reason, automatic choice moves
    on) before the op is called."""
    from mmdkernels.attention import _op_reasons

    def reasons(dim, backend):
        return _op_reasons(torch.zeros(1, 2, dim), torch.zeros(1, 2, 4, dim), 3, backend)

    assert reasons(256, "cuda") == []
    assert reasons(264, "cuda") == ["q must have head size Dh in [1, 256] for the CUDA kernel, got 264"]
    assert reasons(264, "triton") == []


def test_environment_selects_sdpa(monkeypatch):
    q, k, v, lengths = make_problem((2, 4, 4, 30, 16), torch.float32, seed=6)
    monkeypatch.setenv("MMDKERNELS_BACKEND", "sdpa")
    assert_matches_reference(mmdkernels.decode_attention(q, k, v, lengths), q, k, v, lengths)


def test_compiled_op_clamps_lengths():
    """The kernel never reads past the cache, whatever lengths it gets from callers that skip the Python checks:
    a length past S_max attends to the whole cache, a length of 0 gives 0 rather than NaN."""
    q, k, v, _ = make_problem((2, 3, 3, 20, 16), torch.float32, "full", seed=7)
    out = ops.decode_attention_op("cpp")(q, k, v, torch.tensor([0, 999]), 0.25)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert_matches_reference(out[1:], q[1:], k[1:], v[1:], 20)


def test_opcheck_compiled_op():
    q, k, v, lengths = make_problem((3, 4, 2, 600, 16), torch.float32, seed=8)
    torch.library.opcheck(ops.decode_attention_op("cpp"), (q, k, v, lengths, 0.25))


@pytest.mark.parametrize("int_lengths", [False, True])
def test_torch_compile_fullgraph(int_lengths):
    torch._dynamo.reset()
    """bfloat16: an int length goes to SDPA (sliced), a traced tensor of lengths to the C++ custom op."""
    q, k, v, lengths = make_problem((2, 4, 2, 40, 16), torch.bfloat16, "full" if int_lengths else "varying", seed=9)
    lengths = 40 if int_lengths else lengths

    def step(q, k_cache, v_cache, lengths):  # nothing else in the graph: no C++ for inductor to compile
        return mmdkernels.decode_attention(q, k_cache, v_cache, lengths)

    compiled = torch.compile(step, fullgraph=True)
    assert_matches_reference(compiled(q, k, v, lengths), q, k, v, lengths)  # eager may take another backend
    torch._dynamo.reset()


GOOD = make_problem((2, 4, 2, 10, 8), torch.float32, "full")


def bad_case(**changes):
    args = dict(zip(("q", "k_cache", "v_cache", "lengths"), GOOD))
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (bad_case(q=[[1.0]]), TypeError, r"q must be a torch.Tensor of shape \[B, H, Dh\]"),
        (bad_case(q=torch.zeros(2, 4, 8, dtype=torch.long)), TypeError, "q must be a floating tensor"),
        (bad_case(q=torch.randn(2, 4)), ValueError, r"q must have shape \[B, H, Dh\]"),
        (bad_case(k_cache=torch.randn(2, 2, 10)), ValueError, r"k_cache must have shape \[B, H_kv, S_max, Dh\]"),
        (bad_case(k_cache=torch.randn(3, 2, 10, 8)), ValueError, r"k_cache must have shape \[B=2"),
        (bad_case(k_cache=torch.randn(2, 2, 10, 9)), ValueError, "Dh=8"),
        (bad_case(k_cache=torch.randn(2, 3, 10, 8)), ValueError, "H_kv heads dividing H = 4"),
        (bad_case(v_cache=torch.randn(2, 2, 11, 8)), ValueError, "v_cache must have k_cache's shape"),
        (bad_case(v_cache=GOOD[2].half()), TypeError, "v_cache must have k_cache's dtype torch.float32"),
        (bad_case(q=GOOD[0].half()), TypeError, r"k_cache must have q's dtype torch.float16 \(or bfloat16"),
        (bad_case(k_cache="cache"), TypeError, "k_cache must be a torch.Tensor"),
        (bad_case(lengths=0), ValueError, r"lengths must be in \[1, S_max = 10\], got values in \[0, 0\]"),
        (bad_case(lengths=11), ValueError, r"lengths must be in \[1, S_max = 10\]"),
        (bad_case(lengths=torch.tensor([3, 11])), ValueError, r"got values in \[3, 11\]"),
        (bad_case(lengths=torch.tensor([0, 5])), ValueError, r"lengths must be in \[1, S_max = 10\]"),
        (bad_case(lengths=torch.tensor([3, 4], dtype=torch.int32)), TypeError, "int64 tensor"),
        (bad_case(lengths=torch.tensor([3.0, 4.0])), TypeError, "int64 tensor"),
        (bad_case(lengths=torch.tensor([3, 4, 5])), ValueError, r"lengths must have shape \[B\] = \(2,\)"),
        (bad_case(lengths=[3, 4]), TypeError, "lengths must be an int or an int64 tensor"),
        (bad_case(lengths=True), TypeError, "lengths must be an int or an int64 tensor"),
        (bad_case(scale="big"), TypeError, "scale must be a float"),
        (bad_case(scale=float("nan")), ValueError, "scale must be finite"),
        (bad_case(backend="fortran"), ValueError, "backend must be one of"),
        (bad_case(k_cache=torch.empty(2, 2, 10, 8, device="meta")), ValueError, "k_cache is on meta but q is on cpu"),
        (bad_case(lengths=torch.ones(2, dtype=torch.long, device="meta")), ValueError, "lengths is on meta"),
    ],
)
def test_bad_input_raises(args, error, match):
    with pytest.raises(error, match=match):
        mmdkernels.decode_attention(**args)


def test_compiled_op_checks_its_arguments():
    """The C++ op repeats the checks (TORCH_CHECK) for callers that bypass the Python layer."""
    op = ops.decode_attention_op("cpp")
    q, k, v, lengths = GOOD
    with pytest.raises(RuntimeError, match="k_cache must have shape"):
        op(q, k[:, :, :, :4], v, lengths, 1.0)
    with pytest.raises(RuntimeError, match="v_cache must have k_cache's shape"):
        op(q, k, v[:, :, :5], lengths, 1.0)
    with pytest.raises(RuntimeError, match="lengths must have dtype Long"):
        op(q, k, v, lengths.int(), 1.0)
    with pytest.raises(RuntimeError, match="lengths must have shape"):
        op(q, k, v, lengths[:1], 1.0)
    with pytest.raises(RuntimeError, match="q must be float32, bfloat16 or float16"):
        op(q.double(), k.double(), v.double(), lengths, 1.0)
