"""The op layer: torch.library registration (opcheck, fake tensors, torch.compile), the bandwidth chain, the build."""

import glob
import math
import os
import subprocess
import sys

import pytest
import torch
from mmd_cases import EXP_REL_ERROR, chain_floor
from tolerances import assert_close_to_reference, table_floor

from mmdkernels.mmd import ops
from mmdkernels.mmd import reference as ref
from mmdkernels.mmd.plan import DIRECT_EXP, FROM_BASE, build_plan

DTYPES = (torch.float64, torch.float32)  # the reference's, the kernel's (and the rule's baseline's)


def _op_inputs(num_samples=23, num_codebooks=3, dim=5, mode="pairwise"):
    z = ref.standardize(torch.randn(num_samples, num_codebooks, dim)).contiguous()
    perms = ref.draw_permutations(num_samples, num_codebooks, torch.Generator().manual_seed(0), z.device)
    groups = ref.codebook_groups(num_codebooks, mode)
    return z, perms, groups, build_plan(ref.DEFAULT_BANDWIDTHS).as_op_args()


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_compiled_ops(compute_grad):
    z, perms, groups, plan = _op_inputs()
    torch.library.opcheck(ops.shuffle_op("cpp"), (z, perms, groups, *plan, [0.1, 0.1, -0.2], compute_grad))
    torch.library.opcheck(ops.dhsic_op("cpp"), (z, groups, *plan, compute_grad))


def test_default_plan_is_one_exp_and_powers():
    plan = build_plan(ref.DEFAULT_BANDWIDTHS)
    assert plan.base_coef == pytest.approx(0.005)
    assert plan.coefs == pytest.approx((0.01, 0.025, 0.05, 0.1, 0.5, 5.0))
    assert plan.src == (FROM_BASE, FROM_BASE, 1, 2, 3, 4)
    assert plan.step == (2, 5, 2, 2, 5, 10)
    direct = build_plan((0.37, math.pi))
    assert direct.src == (DIRECT_EXP, DIRECT_EXP) and direct.base_coef == 0.0


@pytest.mark.parametrize(
    "bandwidths", [ref.DEFAULT_BANDWIDTHS, (0.37, math.pi, 13.3), (0.37, 2.9, 13.3), (1.0, 2.0, 4.0, 8.0)]
)
def test_bandwidth_chain_matches_exp(bandwidths):
    """The shared tile header's chain (what the CUDA kernel runs) against float64 exp, over the distances that occur."""
    ops.shuffle_op("cpp")  # loads the extension
    plan = build_plan(bandwidths)
    d = torch.cat([torch.linspace(0, 1, 2001), torch.linspace(1, 200, 2001), torch.tensor([0.0, 1e-6, 5e3])])
    got = torch.ops.mmdkernels.bandwidth_chain_eval(d, *plan.as_op_args())
    expected, baseline = (torch.exp(-torch.tensor(plan.coefs, dtype=t)[None] * d.to(t)[:, None]) for t in DTYPES)
    # the rule, PyTorch's float32 exp as the baseline; values <= 1, so the floor is absolute: the kernel's exp error,
    # which the chain's powers amplify (mmd_cases.chain_floor), plus a few roundings
    floor = EXP_REL_ERROR["cpu"] + chain_floor(bandwidths) + table_floor(torch.float32)
    assert_close_to_reference(got, expected, baseline, name=f"chain {bandwidths}", floor=floor, scale=1.0)
    assert torch.all(got[0] == 1.0)


def test_opcheck_bandwidth_chain_eval():
    """The chain's test hook is a registered op too: schema and autograd registration (CPU only, no fake: nothing
    traces it)."""
    ops.shuffle_op("cpp")  # loads the extension
    args = (torch.linspace(0, 50, 37), *build_plan(ref.DEFAULT_BANDWIDTHS).as_op_args())
    checks = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.mmdkernels.bandwidth_chain_eval.default, args, test_utils=checks)


def test_torch_compile_fullgraph_through_the_op():
    """The custom op traces without graph breaks (fake implementation + registered autograd)."""
    z, perms, groups, plan = _op_inputs(mode="joint")
    op = ops.shuffle_op("cpp")

    def loss_fn(t):
        loss, _ = op(t, perms, groups, *plan, [0.1, 0.1, -0.2], True)
        return 3.0 * loss

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    a = z.clone().requires_grad_()
    b = z.clone().requires_grad_()
    compiled(a).backward()
    loss_fn(b).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_lean_import():
    """`import mmdkernels` loads no compiled extension, no triton, and does not initialise CUDA."""
    code = (
        "import sys, torch, mmdkernels; "
        "assert 'mmdkernels._C' not in sys.modules; assert 'triton' not in sys.modules; "
        "assert not torch.cuda.is_initialized(); print('lean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "lean" in out.stdout, out.stderr


def test_cuda_sources_were_compiled_when_the_toolchain_is_there():
    """CI builds the CUDA kernels (nvcc + CUDA torch, no GPU needed); the built module must load."""
    from torch.utils.cpp_extension import CUDA_HOME

    if not (torch.version.cuda and CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))):
        pytest.skip(reason="no nvcc/CUDA build of torch here, so the CUDA kernels are not built")
    if os.environ.get("MMDKERNELS_SKIP_CUDA") == "1":
        pytest.skip(reason="MMDKERNELS_SKIP_CUDA=1 disabled the CUDA build")
    import mmdkernels

    package_dir = os.path.dirname(mmdkernels.__file__)
    assert glob.glob(os.path.join(package_dir, "_C_cuda*.so")), "the CUDA extension was not built"
    from mmdkernels import _ext

    assert _ext.cuda_extension() is not None, _ext.load_error("cuda")
