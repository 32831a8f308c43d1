"""Triton backend of the fused RVQ encode/decode (mmdkernels/rvq/triton_kernels.py) against the PyTorch reference.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1), so the shapes are small.

    data                what must hold
    small integers      codes identical to the reference, ties included (all arithmetic is exact)
    random floats       every code the nearest entry to the kernel's own residual, up to what rounding allows (the
                        rule of tests/tolerances.py: assert_codes_near_optimal); a near-tie may break either way
    any                 quantized = the codebook entries the codes select; decode = the reference, bit for bit (same
                        float32 additions in the same order k = 0, 1, ...)
"""

import itertools
import os
import subprocess
import sys

import pytest
import torch
from triton_cases import interpreter_marks

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")
pytestmark = interpreter_marks("tests/test_rvq_gpu.py")

from tolerances import assert_codes_near_optimal  # noqa: E402

from mmdkernels.rvq import reference, triton_kernels  # noqa: E402

# (N, K, C, D), every combination: N = 0, 1 and not a multiple of the row block; K = 1 (no residual); C = 1, below, at
# and above one entry tile; D = 1, odd and a power of two (all below tl.dot's 16 or padded to 32).
SHAPES = list(itertools.product((0, 1, 7, 33, 70), (1, 2, 4), (1, 5, 64, 100), (1, 3, 17, 32)))


def _shape_id(shape) -> str:
    return "N{}-K{}-C{}-D{}".format(*shape)


def _integer_case(shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] and codebooks [K, C, D] of small integers (every score exact), a quarter of the entries duplicated."""
    num_rows, num_stages, num_entries, dim = shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 9, (num_rows, dim), generator=generator).float()
    codebooks = torch.randint(-3, 4, (num_stages, num_entries, dim), generator=generator).float()
    for stage in range(num_stages):
        copies = torch.randperm(num_entries, generator=generator)[: num_entries // 4]
        codebooks[stage, copies] = codebooks[stage, torch.randint(0, num_entries, copies.shape, generator=generator)]
    return x, codebooks


def _float_case(shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random x [N, D] and codebooks [K, C, D] with entries shrinking by stage, like trained RVQ codebooks."""
    num_rows, num_stages, num_entries, dim = shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, dim, generator=generator)
    stage_scales = 0.5 ** torch.arange(num_stages, dtype=torch.float32)
    codebooks = torch.randn(num_stages, num_entries, dim, generator=generator) * stage_scales[:, None, None]
    return x, codebooks


def _encode(x, codebooks, return_quantized=True):
    return triton_kernels.rvq_encode_triton(x, codebooks, reference.codebook_sqnorms(codebooks), return_quantized)


def _decode_ref_rows(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """reference.rvq_decode_ref on rows: codes [N, K] -> [N, D]."""
    return reference.rvq_decode_ref(codes.t()[None], codebooks)[0].t()


def _gathered(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """codebooks[k, codes[n, k]] as [N, K, D]."""
    return codebooks[torch.arange(codebooks.shape[0]), codes]


def _check_outputs(codes, quantized, codebooks, num_rows) -> None:
    """Shapes, every output written (no -1 / NaN sentinel left), and quantized = the selected entries."""
    num_stages, num_entries, dim = codebooks.shape
    assert codes.dtype == torch.int64 and codes.shape == (num_rows, num_stages)
    assert quantized.dtype == torch.float32 and quantized.shape == (num_rows, num_stages, dim)
    assert ((codes >= 0) & (codes < num_entries)).all(), "the kernel left unwritten (-1) or invalid codes"
    assert torch.isfinite(quantized).all(), "the kernel left unwritten (NaN) quantized entries"
    torch.testing.assert_close(quantized, _gathered(codes, codebooks), rtol=0, atol=0)


def _count_tied_minima(x: torch.Tensor, codebooks: torch.Tensor) -> int:
    """Rows and stages, along the reference's path, where two or more entries share the minimal score."""
    sqnorms = reference.codebook_sqnorms(codebooks)
    residual, tied = x, 0
    for stage in range(codebooks.shape[0]):
        scores = sqnorms[stage][None, :] - 2.0 * (residual @ codebooks[stage].t())
        best = scores.min(dim=1, keepdim=True).values
        tied += int(((scores == best).sum(dim=1) > 1).sum())
        residual = residual - codebooks[stage][scores.argmin(dim=1)]
    return tied


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_integer_codes_match_reference_exactly(shape):
    x, codebooks = _integer_case(shape, seed=sum(shape))
    codes, quantized = _encode(x, codebooks)
    ref_codes, _ = reference.rvq_encode_rows_ref(x, codebooks)
    _check_outputs(codes, quantized, codebooks, shape[0])
    assert torch.equal(codes, ref_codes)


def test_integer_cases_contain_ties():
    """Guards the test above: its data must exercise the tie rule, within and across entry tiles."""
    x, codebooks = _integer_case((70, 4, 100, 3), seed=177)
    assert _count_tied_minima(x, codebooks) >= 20


@pytest.mark.parametrize("num_stages", [1, 2])
def test_exact_ties_go_to_lowest_index(num_stages):
    """Rows equidistant from two entries, or next to a duplicated entry, with the pair within one entry tile, in two
    tiles, and across a tile edge; every other entry is far away. Expected code: the pair's lower index."""
    num_entries, dim = 100, 3
    pairs = [(3, 5), (10, 70), (63, 64), (0, 99), (40, 41)]
    generator = torch.Generator().manual_seed(5)
    codebooks = torch.randint(-3, 4, (num_stages, num_entries, dim), generator=generator).float()
    codebooks[0] += 1000.0
    offset = torch.tensor([1.0, -2.0, 0.0])
    rows, expected = [], []
    for p, (low, high) in enumerate(pairs):
        center = torch.tensor([20.0 * p, 0.0, 0.0])
        codebooks[0, low], codebooks[0, high] = center + offset, center - offset  # equidistant from center
        rows.append(center)
        expected.append(low)
    duplicate = torch.tensor([20.0 * len(pairs), 0.0, 0.0])
    codebooks[0, 50] = codebooks[0, 90] = duplicate
    rows.append(duplicate + torch.tensor([0.0, 1.0, 0.0]))
    expected.append(50)
    x = torch.stack(rows)
    codes, quantized = _encode(x, codebooks)
    ref_codes, _ = reference.rvq_encode_rows_ref(x, codebooks)
    _check_outputs(codes, quantized, codebooks, x.shape[0])
    assert codes[:, 0].tolist() == expected
    assert torch.equal(codes, ref_codes)


@pytest.mark.parametrize("shape", [shape for shape in SHAPES if shape[0] > 0], ids=_shape_id)
def test_float_codes_match_reference_up_to_rounding(shape):
    x, codebooks = _float_case(shape, seed=sum(shape))
    codes, quantized = _encode(x, codebooks)
    _check_outputs(codes, quantized, codebooks, shape[0])
    assert_codes_near_optimal(x, codebooks, codes, name="Triton codes")


def test_codes_only_returns_empty_quantized():
    x, codebooks = _integer_case((33, 2, 5, 3), seed=2)
    codes, quantized = _encode(x, codebooks, return_quantized=False)
    assert quantized.shape == (0,) and quantized.dtype == torch.float32
    assert torch.equal(codes, reference.rvq_encode_rows_ref(x, codebooks)[0])


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_decode_matches_reference(shape):
    num_rows, num_stages, num_entries, _ = shape
    _, codebooks = _float_case(shape, seed=sum(shape) + 1)
    codes = torch.randint(0, num_entries, (num_rows, num_stages), generator=torch.Generator().manual_seed(3))
    out = triton_kernels.rvq_decode_triton(codes, codebooks)
    assert out.dtype == torch.float32 and out.shape == (num_rows, codebooks.shape[2])
    assert torch.isfinite(out).all(), "the kernel left unwritten (NaN) outputs"
    torch.testing.assert_close(out, _decode_ref_rows(codes, codebooks), rtol=0, atol=0)


def test_decode_inverts_encode_residual():
    """x = decode(encode(x)) + the final residual: decode sums exactly the entries encode subtracted."""
    x, codebooks = _integer_case((33, 4, 100, 17), seed=9)
    codes, quantized = _encode(x, codebooks)
    assert torch.equal(triton_kernels.rvq_decode_triton(codes, codebooks), quantized.sum(dim=1))  # integers: exact


def _bad_encode_inputs():
    x, codebooks = _integer_case((7, 2, 5, 3), seed=1)
    sqnorms = reference.codebook_sqnorms(codebooks)
    return [
        pytest.param((x.double(), codebooks, sqnorms), TypeError, "x", id="x-float64"),
        pytest.param((x.tolist(), codebooks, sqnorms), TypeError, "x", id="x-list"),
        pytest.param((x.t(), codebooks, sqnorms), ValueError, "x", id="x-noncontiguous"),
        pytest.param((x[:, :2].contiguous(), codebooks, sqnorms), ValueError, "D", id="x-wrong-D"),
        pytest.param((x, codebooks.half(), sqnorms), TypeError, "codebooks", id="codebooks-float16"),
        pytest.param((x, codebooks[0], sqnorms), ValueError, "codebooks", id="codebooks-2d"),
        pytest.param((x, codebooks[:, :0], sqnorms[:, :0]), ValueError, "codebooks", id="codebooks-C0"),
        pytest.param((x, codebooks, sqnorms[:, :4].contiguous()), ValueError, "sqnorms", id="sqnorms-wrong-C"),
        pytest.param((x, codebooks, sqnorms.int()), TypeError, "sqnorms", id="sqnorms-int32"),
    ]


@pytest.mark.parametrize("args, error, name", _bad_encode_inputs())
def test_encode_rejects_bad_inputs(args, error, name):
    with pytest.raises(error, match=name):
        triton_kernels.rvq_encode_triton(*args, True)


@pytest.mark.parametrize(
    "codes, error, name",
    [
        (torch.zeros(4, 2, dtype=torch.int32), TypeError, "codes"),
        (torch.zeros(4, 3, dtype=torch.int64), ValueError, "codes"),
        (torch.full((4, 2), 5, dtype=torch.int64), ValueError, "codes"),
        (torch.full((4, 2), -1, dtype=torch.int64), ValueError, "codes"),
    ],
    ids=["int32", "wrong-K", "code-C", "code-negative"],
)
def test_decode_rejects_bad_inputs(codes, error, name):
    codebooks = torch.zeros(2, 5, 3)
    with pytest.raises(error, match=name):
        triton_kernels.rvq_decode_triton(codes, codebooks)


def test_kernels_compile_for_sm90():
    """The interpreter runs plain Python, so it accepts code that Triton's compiler rejects: lower each kernel to
    sm_90 machine code (in a process without TRITON_INTERPRET; Triton ships ptxas, no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, __file__, "--compile-sm90"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _compile_kernels_for_sm90() -> None:
    """Compiles both kernels with the constants the host functions launch them with, for D = 17 and D = 128."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sizes = {"num_rows": "i32", "num_stages": "i32", "num_entries": "i32"}
    encode_signature = {
        **{name: "*fp32" for name in ("x_ptr", "codebooks_ptr", "sqnorms_ptr", "quantized_ptr")},
        "codes_ptr": "*i64",
        **sizes,
    }
    decode_signature = {"codes_ptr": "*i64", "codebooks_ptr": "*fp32", "out_ptr": "*fp32", **sizes}
    launches = []
    for dim in (17, 128):
        block_d = triton_kernels._feature_block(dim)
        shape = {"DIM": dim, "BLOCK_N": triton_kernels.BLOCK_N, "BLOCK_D": block_d}
        entry_block = triton_kernels._entry_block(block_d)
        for return_quantized in (True, False):
            constexprs = {**shape, "RETURN_QUANTIZED": return_quantized, "BLOCK_C": entry_block}
            launches.append((triton_kernels._rvq_encode_kernel, encode_signature, constexprs))
        launches.append((triton_kernels._rvq_decode_kernel, decode_signature, shape))
    for kernel, signature, constexprs in launches:
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        triton.compile(
            ASTSource(kernel, signature, constexprs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": triton_kernels.NUM_WARPS},
        )


if __name__ == "__main__" and sys.argv[1:] == ["--compile-sm90"]:
    _compile_kernels_for_sm90()
