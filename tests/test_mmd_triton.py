"""Triton backend of the fused MMD loss (mmdkernels/mmd/triton_{shuffle,dhsic}.py) against the float64 reference.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1), so the shapes are small.

Tolerances: the rule of tests/tolerances.py against the float64 reference (autograd for the gradient) on the same z
and perms, with PyTorch's float32 reference as the baseline. The loss floor is relative to the size of the summed
terms before they cancel (Case.loss_scale); the gradient floor, relative to max |grad|, adds the bandwidth chain's
amplification of exp's rounding (mmd_cases.mmd_grad_floor; 0 for one exp per bandwidth).
"""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from triton_cases import interpreter_marks

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")
pytestmark = interpreter_marks("tests/test_mmd_gpu.py")

from mmd_cases import GRAD_FLOOR_CPU, mmd_grad_floor  # noqa: E402
from tolerances import assert_close_to_reference  # noqa: E402

from mmdkernels.mmd import plan, reference, triton_common, triton_dhsic, triton_shuffle  # noqa: E402

DIRECT_BANDWIDTHS = (0.3, 1.7, 7.1)  # no common base within plan.MAX_CHAIN_POWER: one exp per bandwidth
# (N, K, D): N = 2 and N not a multiple of the 16-row blocks; K = 1 and 2; D = 1, odd, and 17 (two feature chunks).
# The symmetric planes are walked once per block pair by default: N <= 16 is one diagonal block, N = 33 three blocks
# (odd count, the last partial), N = 64 four (even count: the first two own one block more).
SHAPES = [(2, 1, 1), (2, 2, 5), (7, 3, 5), (7, 2, 17), (33, 1, 16), (33, 3, 16), (64, 2, 5), (64, 3, 1)]
OPS = ("shuffle", "dhsic")


def _samples(shape, seed: int, quantized: bool = False) -> torch.Tensor:
    """Standardised float32 samples [N, K, D]; quantized ones take 3 values per feature (exact duplicate rows)."""
    generator = torch.Generator().manual_seed(seed)
    if quantized:
        raw = torch.randint(0, 3, shape, generator=generator).float()
    else:
        raw = torch.randn(shape, generator=generator)
    return reference.standardize(raw).contiguous()


class Case:
    """One problem: samples, permutations, groups, bandwidths and the shuffle weights (unbiased normalisation)."""

    def __init__(self, z: torch.Tensor, mode: str, bandwidths, seed: int):
        num_samples, num_codebooks, _ = z.shape
        self.z = z
        self.perms = reference.draw_permutations(num_samples, num_codebooks, torch.Generator().manual_seed(seed), None)
        self.groups = reference.codebook_groups(num_codebooks, mode)
        self.bandwidths = tuple(bandwidths)
        self.weights, _ = reference.normalization_weights(
            "unbiased", num_samples, 1, self.groups.shape[0], len(self.bandwidths)
        )

    def reference_loss(self, op: str, z: torch.Tensor, weights=None) -> torch.Tensor:
        if op == "shuffle":
            weights = self.weights if weights is None else weights
            return reference.shuffle_sums_ref(z, self.perms, self.groups, self.bandwidths, weights)
        return reference.dhsic_ref(z, self.groups, self.bandwidths)

    def reference_with_grad(self, op: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.z.detach().to(dtype).clone().requires_grad_()
        loss = self.reference_loss(op, z)
        loss.backward()
        return loss.detach(), z.grad

    def loss_scale(self, op: str) -> float:
        """Size of the summed terms before they cancel in the loss."""
        if op == "shuffle":
            magnitudes = [abs(w) for w in self.weights]
            return self.reference_loss(op, self.z.double(), magnitudes).item()
        # each of dHSIC's three means lies in [0, 1]
        return float(self.groups.shape[0] * len(self.bandwidths))

    def run_kernel(self, op: str, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        plan_args = plan.build_plan(self.bandwidths).as_op_args()
        if op == "shuffle":
            return triton_shuffle.mmd_shuffle_triton(
                self.z, self.perms, self.groups, *plan_args, list(self.weights), compute_grad
            )
        return triton_dhsic.mmd_dhsic_triton(self.z, self.groups, *plan_args, compute_grad)


def _check_against_reference(case: Case, op: str, compute_grad: bool) -> None:
    loss, grad = case.run_kernel(op, compute_grad)
    assert loss.dtype == torch.float32 and loss.shape == ()
    ref_loss, ref_grad = case.reference_with_grad(op, torch.float64)
    f32_loss, f32_grad = case.reference_with_grad(op, torch.float32)
    assert_close_to_reference(loss, ref_loss, f32_loss, name=f"{op} loss", scale=case.loss_scale(op))
    if not compute_grad:
        assert grad.shape == (0,)
        return
    assert grad.dtype == torch.float32 and grad.shape == case.z.shape
    assert torch.isfinite(grad).all(), "the kernel left unwritten (NaN) gradient entries"
    floor = mmd_grad_floor(case.bandwidths)
    assert_close_to_reference(grad, ref_grad, f32_grad, name=f"{op} gradient", kind="gradient", floor=floor)


def _shape_mode_params():
    return [
        pytest.param(shape, mode, id=f"N{shape[0]}-K{shape[1]}-D{shape[2]}-{mode}")
        for shape in SHAPES
        for mode in reference.MODES
        if mode == "joint" or shape[1] >= 2
    ]


@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "loss_only"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape, mode", _shape_mode_params())
def test_default_bandwidths_match_reference(shape, mode, op, compute_grad):
    case = Case(_samples(shape, seed=sum(shape)), mode, reference.DEFAULT_BANDWIDTHS, seed=7)
    _check_against_reference(case, op, compute_grad)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape, mode", [((7, 3, 5), "pairwise"), ((33, 2, 16), "joint")])
def test_direct_exp_bandwidths_match_reference(shape, mode, op):
    assert set(plan.build_plan(DIRECT_BANDWIDTHS).src) == {plan.DIRECT_EXP}
    case = Case(_samples(shape, seed=3), mode, DIRECT_BANDWIDTHS, seed=5)
    _check_against_reference(case, op, compute_grad=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", reference.MODES)
def test_duplicate_rows_match_reference(mode, op):
    z = _samples((64, 3, 2), seed=11, quantized=True)
    assert torch.unique(z[:, 0], dim=0).shape[0] < z.shape[0], "the case needs exact duplicate rows"
    case = Case(z, mode, reference.DEFAULT_BANDWIDTHS, seed=13)
    _check_against_reference(case, op, compute_grad=True)


@contextlib.contextmanager
def _deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) inside: the Triton kernels then walk every tile of a symmetric plane."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape, mode", [((50, 2, 3), "pairwise"), ((48, 3, 2), "joint")])
def test_full_plane_walk_matches_reference_and_is_reproducible(shape, mode, op):
    """Under torch.use_deterministic_algorithms(True) (every tile, no atomics) the kernels obey the rule too and two
    runs agree bit for bit; the default walk (each block pair once: 4 blocks, the last partial; 3 full ones) is
    checked by the other tests."""
    assert triton_common.mirrored_tiles()
    case = Case(_samples(shape, seed=sum(shape)), mode, reference.DEFAULT_BANDWIDTHS, seed=9)
    with _deterministic_algorithms():
        assert not triton_common.mirrored_tiles()
        _check_against_reference(case, op, compute_grad=True)
        (loss_a, grad_a), (loss_b, grad_b) = (case.run_kernel(op, compute_grad=True) for _ in range(2))
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)


@pytest.mark.parametrize("deterministic", [False, True], ids=["pairs-once", "full-plane"])
def test_row_ranges_partition_the_symmetric_planes(deterministic):
    """Row-range results over a partition that cuts blocks (an empty range included) sum to the full op's: the
    launches walk the blocks of the global 16-row grid, so the pairs a row owns do not depend on its range.
    N = 50: 4 blocks, the last partial."""
    case = Case(_samples((50, 2, 3), seed=21), "pairwise", reference.DEFAULT_BANDWIDTHS, seed=4)
    plan_args = plan.build_plan(case.bandwidths).as_op_args()
    num_samples = case.z.shape[0]
    ranges = [(0, 7), (7, 7), (7, 33), (33, num_samples)]
    context = _deterministic_algorithms() if deterministic else contextlib.nullcontext()
    with context:
        full_loss, full_grad = case.run_kernel("shuffle", compute_grad=True)
        parts = [
            triton_shuffle.mmd_shuffle_triton(
                case.z, case.perms, case.groups, *plan_args, list(case.weights), True, row_range=rows
            )
            for rows in ranges
        ]
        full_sums = triton_dhsic.mmd_dhsic_sums_triton(case.z, case.groups, *plan_args, 0, num_samples)
        sums = sum(triton_dhsic.mmd_dhsic_sums_triton(case.z, case.groups, *plan_args, *rows) for rows in ranges)
        dhsic_loss, dhsic_grad = case.run_kernel("dhsic", compute_grad=True)
        dhsic_parts = [
            triton_dhsic.mmd_dhsic_rows_triton(case.z, case.groups, *plan_args, sums, *rows, True) for rows in ranges
        ]
    torch.testing.assert_close(sum(loss for loss, _ in parts).float(), full_loss, rtol=1e-5, atol=1e-7)
    grad_atol = GRAD_FLOOR_CPU * full_grad.abs().max().item()
    torch.testing.assert_close(sum(grad for _, grad in parts), full_grad, rtol=0, atol=grad_atol)
    torch.testing.assert_close(sums, full_sums, rtol=1e-6, atol=0)
    for loss, _ in dhsic_parts:
        torch.testing.assert_close(loss, dhsic_loss, rtol=1e-5, atol=1e-7)
    grad_atol = GRAD_FLOOR_CPU * dhsic_grad.abs().max().item()
    torch.testing.assert_close(sum(grad for _, grad in dhsic_parts), dhsic_grad, rtol=0, atol=grad_atol)


def test_chain_sentinels_match_plan():
    assert triton_common.DIRECT_EXP.value == plan.DIRECT_EXP
    assert triton_common.FROM_BASE.value == plan.FROM_BASE
    assert triton_common.MAX_BANDWIDTHS == plan.MAX_BANDWIDTHS
    assert plan.MAX_CHAIN_POWER < 2**triton_common.MAX_STEP_BITS.value


def test_kernels_compile_for_sm90():
    """The interpreter runs plain Python, so it accepts code that Triton's compiler rejects: lower each kernel to
    sm_90 machine code (in a process without TRITON_INTERPRET; Triton ships ptxas, no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, __file__, "--compile-sm90"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _param_type(param, constexprs: dict) -> str:
    """Triton signature type of a kernel parameter, from the kernels' naming convention."""
    if param.name in constexprs:
        return "constexpr"
    if param.name.endswith("_ptr"):
        return "*i32" if param.name == "groups_ptr" else "*fp32"
    return "i32" if param.name.startswith(("num_", "row_")) else "fp32"


def _compile_kernels_for_sm90() -> None:
    """Compiles every kernel with the constants that the host functions launch it with (K = 3, D = 17)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    z = torch.zeros(7, 3, 17)
    shape = {**triton_common.shape_kwargs(z), "BLOCK_D": triton_common.grad_block_d(z)}
    chained, direct = (
        triton_common.plan_kwargs(triton_common.make_plan(*plan.build_plan(bandwidths).as_op_args()))
        for bandwidths in (reference.DEFAULT_BANDWIDTHS, DIRECT_BANDWIDTHS)
    )
    shuffle_flags = [
        dict(SYMMETRIC=True, MIRRORED=True, COMPUTE_GRAD=True, ACCUMULATE_GRAD=False),
        dict(SYMMETRIC=False, MIRRORED=False, COMPUTE_GRAD=False, ACCUMULATE_GRAD=True),
        dict(SYMMETRIC=True, MIRRORED=False, COMPUTE_GRAD=True, ACCUMULATE_GRAD=False),
    ]
    launches = [
        (triton_shuffle._shuffle_term_kernel, {**bandwidths, **shape, **flags})
        for bandwidths, flags in zip((chained, direct, chained), shuffle_flags)
    ]
    launches += [
        (triton_dhsic._dhsic_sums_kernel, {**chained, **shape, "MIRRORED": True}),
        (triton_dhsic._dhsic_grad_kernel, {**direct, **shape, "MIRRORED": True}),
        (triton_dhsic._dhsic_grad_kernel, {**chained, **shape, "MIRRORED": False}),
    ]
    for kernel, constexprs in launches:
        constexprs = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
        signature = {param.name: _param_type(param, constexprs) for param in kernel.params}
        triton.compile(
            ASTSource(kernel, signature, constexprs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": triton_common.NUM_WARPS},
        )


if __name__ == "__main__" and sys.argv[1:] == ["--compile-sm90"]:
    _compile_kernels_for_sm90()
