"""Triton backend of decode attention (mmdkernels/attention/triton_kernels.py) against the float64 reference.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1), so the shapes are small. Tolerances: the rule of
tests/tolerances.py, as in tests/test_attention.py.
"""

import pytest
import torch
from triton_cases import interpreter_marks

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")
pytestmark = interpreter_marks("tests/test_attention_gpu.py")

from test_attention import (  # noqa: E402
    DTYPES,
    LENGTH_KINDS,
    assert_matches_reference,
    fill_past_lengths,
    make_problem,
    shape_id,
    strided_views,
)

import mmdkernels  # noqa: E402
from mmdkernels.attention import ops, triton_kernels  # noqa: E402

# (B, H, H_kv, S_max, Dh): Dh not a power of two (80), grouped-query, and caches long enough to be split (with the
# interpreter's stand-in of 4 SMs, B * H = 3 rows and S_max = 700 give 6 splits and a combine pass).
SHAPES = [(1, 1, 1, 1, 16), (2, 3, 3, 17, 64), (3, 5, 5, 70, 80), (2, 6, 2, 33, 128), (1, 3, 1, 700, 64)]


@pytest.mark.parametrize("lengths_kind", LENGTH_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(dtype, shape, lengths_kind):
    q, k, v, lengths = make_problem(shape, dtype, lengths_kind)
    out = mmdkernels.decode_attention(q, k, v, lengths, backend="triton")
    assert torch.isfinite(out).all(), "NaN garbage past the lengths leaked into the output"
    assert_matches_reference(out, q, k, v, lengths)


def test_long_cache_is_split():
    assert triton_kernels._num_splits(torch.device("cpu"), rows=3, max_len=700) > 1
    assert triton_kernels._num_splits(torch.device("cpu"), rows=64, max_len=700) == 1


@pytest.mark.parametrize("layout", ["slice", "bshd", "feature-major"])
def test_strided_cache_views(layout):
    q, k, v, lengths = strided_views((3, 4, 2, 45, 64), torch.bfloat16, layout)
    assert_matches_reference(mmdkernels.decode_attention(q, k, v, lengths, backend="triton"), q, k, v, lengths)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e4])
def test_entries_past_the_length_are_never_used(garbage):
    q, k, v, lengths = make_problem((3, 4, 4, 50, 16), torch.float32, "varying", seed=3, garbage=garbage)
    clean_k, clean_v = k.clone(), v.clone()
    fill_past_lengths(clean_k, lengths, 0.0)
    fill_past_lengths(clean_v, lengths, 0.0)
    out = mmdkernels.decode_attention(q, k, v, lengths, backend="triton")
    torch.testing.assert_close(out, mmdkernels.decode_attention(q, clean_k, clean_v, lengths, backend="triton"))


def test_same_as_cpp_kernel():
    """Two independent kernels (different summation orders) on the same problem: both within the rule of the same
    float64 reference, rather than within a fixed tolerance of each other."""
    q, k, v, lengths = make_problem((2, 4, 2, 300, 64), torch.float32, seed=11)
    for backend in ("triton", "cpp"):
        assert_matches_reference(mmdkernels.decode_attention(q, k, v, lengths, backend=backend), q, k, v, lengths)


def test_opcheck():
    q, k, v, lengths = make_problem((2, 4, 2, 40, 16), torch.float32, seed=12)
    torch.library.opcheck(ops.decode_attention_op("triton"), (q, k, v, lengths, 0.25))


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 3, 17, 64), (1, 3, 1, 700, 64)], ids=shape_id)
def test_reduced_cache_under_float32_q(shape, cache_dtype):
    """A float32 q over a bfloat16 / float16 cache: the cache's values read exactly, float32 output at float32's
    level (tests/test_reduced_cache.py's rule), the long cache split and combined."""
    from test_reduced_cache import assert_matches_reduced_reference, reduced_problem

    q, k, v, lengths = reduced_problem(shape, cache_dtype)
    out = mmdkernels.decode_attention(q, k, v, lengths, backend="triton")
    assert torch.isfinite(out).all()
    assert_matches_reduced_reference(out, q, k, v, lengths)
