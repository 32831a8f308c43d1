"""Bad input gets a clear ValueError/TypeError naming the argument: never a crash, a hang or a wrong answer."""

import pytest
import torch

import mmdkernels

GOOD = torch.randn(2, 3, 4, 10)


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (torch.randn(2, 3, 10), {}, ValueError, r"x must have shape \[B, K, D, T\]"),
        (torch.randn(2, 3, 4, 10, 1), {}, ValueError, "4 dims"),
        (torch.randint(0, 5, (2, 3, 4, 10)), {}, TypeError, "floating tensor"),
        (torch.randn(2, 4, 4, 4), {"delay": True}, ValueError, "T > K"),
        (torch.randn(2, 4, 4, 3), {"delay": True}, ValueError, "T > K"),
        (torch.randn(1, 3, 4, 1), {}, ValueError, "N = B \\* T' >= 2"),
        (torch.randn(1, 3, 4, 9), {"normalization": "reference"}, ValueError, "batch size B >= 2"),
        (torch.randn(2, 1, 4, 9), {"mode": "pairwise"}, ValueError, "K >= 2"),
        (GOOD, {"mode": "triples"}, ValueError, "mode must be one of"),
        (GOOD, {"estimator": "mean"}, ValueError, "estimator must be one of"),
        (GOOD, {"normalization": "biased"}, ValueError, "normalization must be one of"),
        (GOOD, {"estimator": "dhsic", "normalization": "reference"}, ValueError, "estimator=.shuffle. only"),
        (GOOD, {"bandwidths": ()}, ValueError, "bandwidths must be"),
        (GOOD, {"bandwidths": (1.0, -2.0)}, ValueError, "bandwidths must be"),
        (GOOD, {"bandwidths": tuple(range(1, 10))}, ValueError, "bandwidths must be"),
        (GOOD, {"generator": 3}, TypeError, "generator must be a torch.Generator"),
        (GOOD, {"backend": "fortran"}, ValueError, "backend must be one of"),
        ([[1.0]], {}, TypeError, "torch.Tensor"),
    ],
)
def test_bad_arguments_raise(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        mmdkernels.mmd_loss(x, **kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(value):
    x = GOOD.clone()
    x[1, 2, 3, 4] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        mmdkernels.mmd_loss(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a CUDA generator")
def test_generator_on_other_device_raises():
    with pytest.raises(ValueError, match="generator is on cuda"):
        mmdkernels.mmd_loss(GOOD, generator=torch.Generator(device="cuda"))


def test_generator_device_mismatch_raises_without_gpu():
    """A CUDA tensor cannot exist here, so check the rule through the meta device: a CPU generator for meta x."""
    with pytest.raises(ValueError, match="generator is on cpu but x is on meta"):
        mmdkernels.mmd_loss(torch.empty(2, 3, 4, 10, device="meta"), generator=torch.Generator())


def test_compiled_op_checks_its_arguments():
    """The C++ op repeats the checks (TORCH_CHECK) for callers that bypass the Python layer."""
    from mmdkernels.mmd import ops

    op = ops.shuffle_op("cpp")
    z = torch.randn(10, 3, 4)
    perms = torch.stack([torch.randperm(10) for _ in range(3)])
    groups = torch.ones(1, 3, dtype=torch.int32)
    plan = ([0.5], [-2], [1], 0.0)
    with pytest.raises(RuntimeError, match="z must have dtype Float"):
        op(z.double(), perms, groups, *plan, [1.0, 1.0, -2.0], False)
    with pytest.raises(RuntimeError, match="perms must have shape"):
        op(z, perms[:2], groups, *plan, [1.0, 1.0, -2.0], False)
    with pytest.raises(RuntimeError, match=r"perms must hold indices in \[0, 10\)"):
        op(z, perms + 5, groups, *plan, [1.0, 1.0, -2.0], False)
    with pytest.raises(RuntimeError, match="groups must have shape"):
        op(z, perms, torch.ones(1, 2, dtype=torch.int32), *plan, [1.0, 1.0, -2.0], False)
    with pytest.raises(RuntimeError, match="term_weights"):
        op(z, perms, groups, *plan, [1.0], False)
