"""RVQ encode/decode through the public API: every available backend against the reference, ties, bad input."""

import pytest
import torch
from tolerances import assert_codes_near_optimal

import mmdkernels
from mmdkernels import _dispatch
from mmdkernels.rvq import ops
from mmdkernels.rvq.reference import codebook_sqnorms

# every test once per tile kernel of the C++ encoder: the GEMM on each provider, and the fused micro-kernel
# (tests/conftest.py), forced
pytestmark = pytest.mark.usefixtures("each_rvq_path")


def cpu_backends(num_rows: int) -> list[str]:
    backends = ["cpp"]
    if num_rows <= 128 and _dispatch.triton_interpreter_enabled():
        backends.append("triton")
    return backends


def integer_problem(batch, dim, frames, num_codebooks, num_entries, seed=0):
    """Small-integer latents and codebooks: every score is exact in float32, so codes must match exactly, and
    duplicated entries plus a coarse value grid make exact ties (the lowest index must win)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (batch, dim, frames), generator=g).float()
    books = torch.randint(-2, 3, (num_codebooks, num_entries, dim), generator=g).float()
    books[:, num_entries // 2 :] = books[:, : num_entries - num_entries // 2]  # second half repeats the first
    return x, books


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 5, 2, 7), (3, 17, 40, 4, 64), (2, 128, 300, 4, 2048)])
def test_codes_identical_on_integer_data_with_ties(shape):
    batch, dim, frames, num_codebooks, num_entries = shape
    x, books = integer_problem(batch, dim, frames, num_codebooks, num_entries)
    expected, expected_q = mmdkernels.rvq_encode(x, books, return_quantized=True, backend="reference")
    for backend in cpu_backends(batch * frames):
        codes, quantized = mmdkernels.rvq_encode(x, books, return_quantized=True, backend=backend)
        assert torch.equal(codes, expected), backend
        assert torch.equal(quantized, expected_q), backend
    if num_entries > 1:  # the duplicated half is never chosen: its twins have lower indices
        assert int(expected.max()) < num_entries - num_entries // 2


def test_clustered_data_matches_reference():
    """Frames drawn near codebook entries (as after k-means): large margins, codes identical."""
    g = torch.Generator().manual_seed(1)
    books = torch.randn(4, 256, 32, generator=g) * torch.tensor([1.0, 0.3, 0.1, 0.03])[:, None, None]
    codes = torch.randint(0, 256, (2, 4, 500), generator=g)
    x = mmdkernels.rvq_decode(codes, books) + 0.001 * torch.randn(2, 32, 500, generator=g)
    for backend in cpu_backends(1000):
        assert torch.equal(mmdkernels.rvq_encode(x, books, backend=backend), codes)


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """[B, D, T] -> [B * T, D], the rows the encoder quantizes; [B, K, T] codes -> [B * T, K] likewise."""
    return x.transpose(1, 2).reshape(-1, x.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_data_codes_are_nearest_up_to_rounding(dtype):
    """Random floats: the kernel may break a near-tie another way than a reference (another summation order), so
    its codes are judged by the rule (tolerances.assert_codes_near_optimal), not by equality. bf16/fp16 inputs are
    quantized in float32: judged on the upcast values."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 24, 200, generator=g).to(dtype)
    books = torch.randn(3, 100, 24, generator=g).to(dtype)
    codes = mmdkernels.rvq_encode(x, books, backend="cpp")
    assert_codes_near_optimal(rows_of(x.float()), books.float(), rows_of(codes), name=f"cpp codes, {dtype}")


def test_non_contiguous_input():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 300, 16, generator=g).transpose(1, 2)  # [B, D=16, T=300] strided
    books = torch.randn(2, 50, 16, generator=g)
    assert not x.is_contiguous()
    codes = mmdkernels.rvq_encode(x, books)
    # both layouts become the same contiguous rows before the kernel: the same code path, so bit for bit
    assert torch.equal(codes, mmdkernels.rvq_encode(x.contiguous(), books))
    assert_codes_near_optimal(rows_of(x), books, rows_of(codes), name="codes of a strided input")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_decode_is_the_sum_of_the_quantized_stages(backend):
    x, books = integer_problem(2, 9, 33, 3, 20, seed=4)
    codes, quantized = mmdkernels.rvq_encode(x, books, return_quantized=True)
    assert torch.equal(mmdkernels.rvq_decode(codes, books, backend=backend), quantized.sum(1))  # integers: exact


def test_many_row_blocks_and_entry_chunks():
    """N past the CPU kernel's 256-row blocks and C past its 2048-entry chunks (lowest index across chunks)."""
    x, books = integer_problem(1, 4, 700, 2, 5000, seed=5)
    assert torch.equal(mmdkernels.rvq_encode(x, books), mmdkernels.rvq_encode(x, books, backend="reference"))


def test_opcheck_compiled_ops():
    x = torch.randn(37, 5)
    books = torch.randn(2, 9, 5)
    sqnorms = codebook_sqnorms(books)
    torch.library.opcheck(ops.encode_op("cpp"), (x, books, sqnorms, True))
    codes = torch.randint(0, 9, (37, 2))
    torch.library.opcheck(ops.decode_op("cpp"), (codes, books))


GOOD_X, GOOD_BOOKS = torch.randn(2, 8, 10), torch.randn(3, 16, 8)


@pytest.mark.parametrize(
    "x, books, error, match",
    [
        (torch.randn(8, 10), GOOD_BOOKS, ValueError, r"x must have shape \[B, D, T\]"),
        (torch.randint(0, 3, (2, 8, 10)), GOOD_BOOKS, TypeError, "floating tensor"),
        (torch.randn(0, 8, 10), GOOD_BOOKS, ValueError, "empty batch"),
        (GOOD_X, torch.randn(3, 16, 7), ValueError, "D = 8"),
        (GOOD_X, torch.randn(16, 8), ValueError, r"codebooks must have shape \[K, C, D\]"),
        (GOOD_X, torch.randn(3, 0, 8), ValueError, r"codebooks must have shape \[K, C, D\]"),
        (GOOD_X.clone().index_fill_(2, torch.tensor([3]), float("nan")), GOOD_BOOKS, ValueError, "NaN"),
        (GOOD_X, GOOD_BOOKS.clone().fill_(float("inf")), ValueError, "codebooks contains NaN"),
    ],
)
def test_encode_bad_input(x, books, error, match):
    with pytest.raises(error, match=match):
        mmdkernels.rvq_encode(x, books)


@pytest.mark.parametrize(
    "codes, error, match",
    [
        (torch.full((2, 3, 5), 16), ValueError, r"codes must be in \[0, 16\)"),
        (torch.full((2, 3, 5), -1), ValueError, r"codes must be in \[0, 16\)"),
        (torch.zeros(2, 3, 5), TypeError, "integer tensor"),
        (torch.zeros(2, 2, 5, dtype=torch.long), ValueError, "K = 3"),
        (torch.zeros(3, 5, dtype=torch.long), ValueError, r"\[B, K, T\]"),
    ],
)
def test_decode_bad_input(codes, error, match):
    with pytest.raises(error, match=match):
        mmdkernels.rvq_decode(codes, GOOD_BOOKS)


def test_compiled_op_rejects_out_of_range_codes():
    """The C++ op repeats the range check for callers that bypass the Python layer."""
    with pytest.raises(RuntimeError, match=r"codes must be in \[0, 16\)"):
        ops.decode_op("cpp")(torch.full((4, 3), 99), GOOD_BOOKS)


def test_tile_kernel_env_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MMDKERNELS_RVQ_TILE", "blas")
    with pytest.raises(RuntimeError, match="MMDKERNELS_RVQ_TILE must be one of auto, gemm, fused; got 'blas'"):
        mmdkernels.rvq_encode(GOOD_X, GOOD_BOOKS, backend="cpp")


@pytest.mark.parametrize("shape", [(1, 3, 13, 3, 33), (2, 130, 301, 2, 100)])
def test_auto_tile_kernel_agrees_with_both_forced_kernels(shape, monkeypatch):
    """auto (a measured choice) encodes exactly like the forced kernels; odd row and entry counts exercise every
    tail of the micro-kernel's tiles and panels."""
    batch, dim, frames, num_codebooks, num_entries = shape
    x, books = integer_problem(batch, dim, frames, num_codebooks, num_entries, seed=7)
    expected = mmdkernels.rvq_encode(x, books, backend="reference")
    for kernel in ("auto", "gemm", "fused"):
        monkeypatch.setenv("MMDKERNELS_RVQ_TILE", kernel)
        assert torch.equal(mmdkernels.rvq_encode(x, books, backend="cpp"), expected), kernel
