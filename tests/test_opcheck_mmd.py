"""torch.library.opcheck for the MMD ops the other test files do not opcheck: the compiled row-range ops
(mmd_shuffle_rows, mmd_dhsic_sums, mmd_dhsic_rows) and every Triton custom op of the MMD and RVQ kernels
(mmd_*_triton, rvq_*_triton); plus the two rules the backends share: one argument contract (csrc/mmd/mmd_args.h,
mmdkernels/mmd/triton_common.py) and one dHSIC statistics formula (csrc/mmd/dhsic_stats.h,
mmdkernels/mmd/dhsic_stats.py). The full compiled ops mmd_shuffle / mmd_dhsic are opchecked in tests/test_mmd_ops.py.

The Triton ops run on CUDA tensors where a GPU is present, else under the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1, set by tests/conftest.py before triton is imported), so the shapes are small: opcheck runs each
op several times (eager, fake tensors, AOT dispatch).
"""

import os

import pytest
import torch

from mmdkernels import _ext
from mmdkernels.mmd import ops
from mmdkernels.mmd import reference as ref
from mmdkernels.mmd.dhsic_stats import dhsic_statistics
from mmdkernels.mmd.plan import build_plan

CUDA = torch.cuda.is_available()
COMPILED_BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not _ext.available("cpu"), reason="the C++ extension is not built")),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not CUDA or not _ext.available("cuda"), reason="no CUDA device or the CUDA extension is not built"
        ),
    ),
]
TRITON_DEVICE = "cuda" if CUDA else "cpu"
# Applied to every Triton test (skip, then silence a warning of Triton's interpreter itself, which warns when a kernel
# loops over range(runtime scalar)).
TRITON_MARKS = (
    pytest.mark.skipif(
        not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
        reason="CPU tensors need the Triton interpreter (TRITON_INTERPRET=1; tests/conftest.py sets it without a GPU)",
    ),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
)
WEIGHTS = [0.1, 0.1, -0.2]


def triton_test(test):
    for mark in TRITON_MARKS:
        test = mark(test)
    return test


def _problem(num_samples, num_codebooks, dim, mode, device, seed=0):
    """Standardised samples [N, K, D], permutations, groups and the default bandwidth plan, on `device`."""
    generator = torch.Generator().manual_seed(seed)
    z = ref.standardize(torch.randn(num_samples, num_codebooks, dim, generator=generator)).contiguous().to(device)
    perms = ref.draw_permutations(num_samples, num_codebooks, generator, None).to(device)
    groups = ref.codebook_groups(num_codebooks, mode, device=device)
    return z, perms, groups, build_plan(ref.DEFAULT_BANDWIDTHS).as_op_args()


# N = 23 (prime, more than one 16-row Triton block) with the row ranges: all rows, a middle block, an empty one.
ROW_RANGES = [(0, 23), (5, 17), (9, 9)]


@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "loss_only"])
@pytest.mark.parametrize("rows", ROW_RANGES, ids=lambda r: f"rows{r[0]}-{r[1]}")
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_opcheck_compiled_row_range_ops(backend, rows, compute_grad):
    device = "cuda" if backend == "cuda" else "cpu"
    z, perms, groups, plan = _problem(23, 3, 5, "pairwise", device)
    shuffle_rows, dhsic_sums, dhsic_rows = ops.row_range_ops(backend)
    torch.library.opcheck(shuffle_rows, (z, perms, groups, *plan, WEIGHTS, *rows, compute_grad))
    torch.library.opcheck(dhsic_sums, (z, groups, *plan, *rows))
    sums = dhsic_sums(z, groups, *plan, 0, z.shape[0])
    torch.library.opcheck(dhsic_rows, (z, groups, *plan, sums, *rows, compute_grad))


@triton_test
@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "loss_only"])
@pytest.mark.parametrize("mode", ref.MODES)
def test_opcheck_triton_mmd_ops(mode, compute_grad):
    pytest.importorskip("triton", reason="the Triton backend needs the triton package")
    z, perms, groups, plan = _problem(19, 2, 3, mode, TRITON_DEVICE)
    torch.library.opcheck(ops.shuffle_op("triton"), (z, perms, groups, *plan, WEIGHTS, compute_grad))
    torch.library.opcheck(ops.dhsic_op("triton"), (z, groups, *plan, compute_grad))
    shuffle_rows, dhsic_sums, dhsic_rows = ops.row_range_ops("triton")
    rows = (3, 18)
    torch.library.opcheck(shuffle_rows, (z, perms, groups, *plan, WEIGHTS, *rows, compute_grad))
    torch.library.opcheck(dhsic_sums, (z, groups, *plan, *rows))
    sums = dhsic_sums(z, groups, *plan, 0, z.shape[0])
    torch.library.opcheck(dhsic_rows, (z, groups, *plan, sums, *rows, compute_grad))


@triton_test
def test_opcheck_triton_mmd_ops_with_autograd():
    """The full Triton ops carry registered autograd (the gradient is computed in the forward pass)."""
    pytest.importorskip("triton", reason="the Triton backend needs the triton package")
    z, perms, groups, plan = _problem(19, 2, 3, "joint", TRITON_DEVICE)
    z.requires_grad_(True)
    torch.library.opcheck(ops.shuffle_op("triton"), (z, perms, groups, *plan, WEIGHTS, True))
    torch.library.opcheck(ops.dhsic_op("triton"), (z, groups, *plan, True))


@triton_test
@pytest.mark.parametrize("return_quantized", [True, False])
def test_opcheck_triton_rvq_ops(return_quantized):
    pytest.importorskip("triton", reason="the Triton backend needs the triton package")
    from mmdkernels.rvq import ops as rvq_ops
    from mmdkernels.rvq.reference import codebook_sqnorms

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(21, 6, generator=generator).to(TRITON_DEVICE)
    codebooks = torch.randn(2, 11, 6, generator=generator).to(TRITON_DEVICE)
    torch.library.opcheck(rvq_ops.encode_op("triton"), (x, codebooks, codebook_sqnorms(codebooks), return_quantized))
    codes = torch.randint(0, 11, (21, 2), generator=generator).to(TRITON_DEVICE)
    torch.library.opcheck(rvq_ops.decode_op("triton"), (codes, codebooks))


# ---------------------------------------------------------------------------------------------------------------------
# One contract, one formula
# ---------------------------------------------------------------------------------------------------------------------

# Arguments outside the contract of docs/mmd_kernels.md ("Inputs"), each as a change to good shuffle-op arguments.
BAD_ARGUMENTS = {
    "groups int64": lambda a: {**a, "groups": a["groups"].long()},
    "groups [G, K-1]": lambda a: {**a, "groups": a["groups"][:, :-1].contiguous()},
    "perms int32": lambda a: {**a, "perms": a["perms"].int()},
    "z float64": lambda a: {**a, "z": a["z"].double()},
    "z with N = 1": lambda a: {**a, "z": a["z"][:1].contiguous(), "perms": a["perms"][:, :1].clone().zero_()},
    "chain_step 0": lambda a: {**a, "chain_step": [0] + a["chain_step"][1:]},
    "chain_step above 1024": lambda a: {**a, "chain_step": a["chain_step"][:-1] + [1025]},
    "chain_src ahead": lambda a: {**a, "chain_src": [1] + a["chain_src"][1:]},
    "coef 0": lambda a: {**a, "coefs": [0.0] + a["coefs"][1:]},
    "two term weights": lambda a: {**a, "term_weights": [1.0, -1.0]},
}


def _shuffle_call(backend, args):
    op = ops.shuffle_op(backend)
    return op(
        args["z"],
        args["perms"],
        args["groups"],
        args["coefs"],
        args["chain_src"],
        args["chain_step"],
        args["chain_base"],
        args["term_weights"],
        False,
    )


@triton_test
@pytest.mark.parametrize("bad", list(BAD_ARGUMENTS))
def test_compiled_and_triton_ops_reject_the_same_arguments(bad):
    """Every backend checks one contract (csrc/mmd/mmd_args.h; its Python twin for Triton in triton_common.py)."""
    pytest.importorskip("triton", reason="the Triton backend needs the triton package")
    z, perms, groups, (coefs, chain_src, chain_step, chain_base) = _problem(9, 3, 2, "pairwise", "cpu")
    good = dict(z=z, perms=perms, groups=groups, coefs=coefs, chain_src=chain_src, chain_step=chain_step,
                chain_base=chain_base, term_weights=WEIGHTS)
    assert set(chain_src) != {-2}, "the case needs a chained plan"
    args = BAD_ARGUMENTS[bad](good)
    backends = ["triton"] + (["cpp"] if _ext.available("cpu") else [])
    for backend in backends:
        _shuffle_call(backend, good)
        with pytest.raises((RuntimeError, ValueError)):
            _shuffle_call(backend, args)


@pytest.mark.parametrize("mode", ref.MODES)
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_compiled_dhsic_statistics_are_the_python_formula(backend, mode):
    """The C++ ops' loss from pass-1 sums (csrc/mmd/dhsic_stats.h) is dhsic_statistics (dhsic_stats.py), which the
    Triton backend uses: the same tensor ops in the same order, so equal to float32 rounding."""
    device = "cuda" if backend == "cuda" else "cpu"
    z, _, groups, plan = _problem(40, 4, 3, mode, device)
    _, dhsic_sums, dhsic_rows = ops.row_range_ops(backend)
    sums = dhsic_sums(z, groups, *plan, 0, z.shape[0])
    loss, _ = dhsic_rows(z, groups, *plan, sums, 0, z.shape[0], False)
    stats = dhsic_statistics(sums, groups, len(plan[0]), with_gradient_terms=True)
    torch.testing.assert_close(loss, stats.loss, rtol=2e-7, atol=1e-9)
    assert stats.gamma.shape == (4, len(plan[0])) and stats.beta.shape == (4, len(plan[0]), z.shape[0])
    assert torch.isfinite(stats.beta).all() and torch.isfinite(stats.gamma).all()
