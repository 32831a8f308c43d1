"""The GPU backends of decode attention (CUDA kernel, compiled Triton, SDPA) against the float64 reference computed
on the same device, with the tolerance rule of tests/test_attention.py. Skips without a CUDA device."""

import pytest
import torch
from test_attention import DTYPES, LENGTH_KINDS, assert_matches_reference, make_problem, shape_id, strided_views

import mmdkernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
BACKENDS = ["cuda", "triton", "sdpa"]
# Few (sequence, head) rows and long caches (split into key ranges and combined) as well as many rows (one split);
# Dh = 16, 64, 80 (not a multiple of 32), 128 and 256 (the CUDA kernel's largest); grouped-query attention.
SHAPES = [
    (1, 1, 1, 1, 16),
    (2, 3, 3, 17, 64),
    (3, 5, 5, 129, 80),
    (5, 7, 7, 33, 128),
    (4, 6, 2, 777, 64),
    (1, 3, 1, 5001, 64),
    (2, 4, 4, 300, 256),
    (64, 16, 16, 1500, 64),
]


def to_cuda(problem):
    return tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in problem)


@pytest.mark.parametrize("lengths_kind", LENGTH_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend, dtype, shape, lengths_kind):
    q, k, v, lengths = to_cuda(make_problem(shape, dtype, lengths_kind))
    out = mmdkernels.decode_attention(q, k, v, lengths, backend=backend)
    assert torch.isfinite(out).all(), "NaN garbage past the lengths leaked into the output"
    assert_matches_reference(out, q, k, v, lengths)


@pytest.mark.parametrize("layout", ["slice", "bshd", "feature-major"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_cache_views(backend, layout):
    q, k, v, lengths = to_cuda(strided_views((3, 4, 2, 45, 64), torch.bfloat16, layout))
    assert_matches_reference(mmdkernels.decode_attention(q, k, v, lengths, backend=backend), q, k, v, lengths)


def test_automatic_choice():
    q, k, v, lengths = to_cuda(make_problem((2, 4, 4, 30, 64), torch.bfloat16))
    assert_matches_reference(mmdkernels.decode_attention(q, k, v, lengths), q, k, v, lengths)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replay_with_new_lengths(backend):
    """A decode step with device lengths never waits for the GPU, so it can be captured once and replayed as the
    lengths (updated in place) grow, as a static-cache generator does."""
    q, k, v, _ = to_cuda(make_problem((2, 4, 2, 200, 64), torch.bfloat16, "full"))
    lengths = torch.tensor([1, 1], device="cuda")
    mmdkernels.decode_attention(q, k, v, lengths, backend=backend)  # compile / load outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mmdkernels.decode_attention(q, k, v, lengths, backend=backend)
    for new_lengths in ([5, 17], [200, 3]):
        lengths.copy_(torch.tensor(new_lengths))
        graph.replay()
        assert_matches_reference(out, q, k, v, lengths)


def test_cuda_kernel_rejects_large_head_size():
    q, k, v, lengths = to_cuda(make_problem((1, 2, 2, 10, 264), torch.float32))
    with pytest.raises(RuntimeError, match=r"'cuda' cannot run this input: q must have head size Dh in \[1, 256\]"):
        mmdkernels.decode_attention(q, k, v, lengths, backend="cuda")
    assert_matches_reference(mmdkernels.decode_attention(q, k, v, lengths), q, k, v, lengths)  # automatic: another


def test_cuda_op_called_directly_rejects_large_head_size():
    """The C++ check behind the Python one, for callers of torch.ops.mmdkernels.decode_attention. On the H200 of
    session 18 this call (then reached through decode_attention(backend="cuda")) crashed its process with a
    segmentation fault instead of raising; the only C++ error a GPU test throws from the CUDA library. Kept apart so
    that the next GPU run shows whether it persists without taking the Python-level test down with it."""
    from mmdkernels.attention import ops

    q, k, v, lengths = to_cuda(make_problem((1, 2, 2, 10, 264), torch.float32))
    with pytest.raises(RuntimeError, match=r"head size Dh in \[1, 256\] for the CUDA kernel, got 264"):
        ops.decode_attention_op("cuda")(q, k, v, lengths, 0.1)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 3, 17, 64), (1, 3, 1, 5001, 64), (64, 16, 16, 1500, 64)], ids=shape_id)
def test_reduced_cache_on_the_gpu(shape, cache_dtype):
    """A float32 q over a bfloat16 / float16 cache: Triton reads it (the automatic choice on CUDA, since the CUDA
    kernel and SDPA take one dtype and say so), float32's tolerance on the cache's values."""
    from test_reduced_cache import assert_matches_reduced_reference, reduced_problem

    q, k, v, lengths = to_cuda(reduced_problem(shape, cache_dtype))
    for backend in ("triton", None):
        out = mmdkernels.decode_attention(q, k, v, lengths, backend=backend)
        assert_matches_reduced_reference(out, q, k, v, lengths)
    with pytest.raises(RuntimeError, match="k_cache / v_cache must have q's dtype torch.float32 for cuda"):
        mmdkernels.decode_attention(q, k, v, lengths, backend="cuda")
