"""Triton backend of the fused MMD loss (mmdkernels/mmd/triton_kernels.py) against the float64 PyTorch reference.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1), so the shapes are small.

Tolerances, against the float64 reference (autograd for the gradient) on the same z and perms:

    quantity        allowed error                                  why
    loss            1e-4 |loss| + 1e-5 scale                       scale: the size of the summed terms before they
                                                                   cancel (docs/mmd_kernels.md)
    gradient        max(rtol max|g|, 2 f32_err) + 1e-8             f32_err: the float32 PyTorch reference's own error;
                                                                   dHSIC's gradient is a near-cancelling difference
                                                                   where float32 itself errs by ~8e-5 of max|g| (the
                                                                   doc's flash-attention rule). The floor covers K = 1
                                                                   dHSIC, whose gradient is exactly 0.
      rtol, one exp per bandwidth    1e-4
      rtol, bandwidth chain          3e-4                          v^1000 amplifies exp's float32 rounding 1000-fold
                                                                   (~6e-5 in the coef-5 kernel, plan.py); with D = 1
                                                                   (close pairs) it reached 1.1e-4 over 64 random cases
"""

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")
pytestmark = [
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="CPU tensors need the Triton interpreter (tests/conftest.py sets it without a GPU); "
        "on a GPU machine tests/test_mmd_gpu.py covers the compiled Triton kernels",
    ),
    # Triton's interpreter itself warns when a kernel loops over range(runtime scalar).
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]

from mmdkernels.mmd import plan, reference, triton_kernels  # noqa: E402

LOSS_RTOL = 1e-4
LOSS_ATOL_PER_SCALE = 1e-5
GRAD_RTOL_DIRECT_EXP = 1e-4
GRAD_RTOL_CHAINED = 3e-4
GRAD_F32_FACTOR = 2.0
GRAD_ATOL = 1e-8

DIRECT_BANDWIDTHS = (0.3, 1.7, 7.1)  # no common base within plan.MAX_CHAIN_POWER: one exp per bandwidth
# (N, K, D): N = 2 and N not a multiple of the 16-row blocks; K = 1 and 2; D = 1, odd, and 17 (two feature chunks).
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

    def reference_with_grad(self, op: str, dtype: torch.dtype) -> tuple[float, torch.Tensor]:
        z = self.z.detach().to(dtype).clone().requires_grad_()
        loss = self.reference_loss(op, z)
        loss.backward()
        return loss.item(), z.grad.double()

    def loss_scale(self, op: str) -> float:
        """Size of the summed terms before they cancel in the loss."""
        if op == "shuffle":
            magnitudes = [abs(w) for w in self.weights]
            return self.reference_loss(op, self.z.double(), magnitudes).item()
        # each of dHSIC's three means lies in [0, 1]
        return float(self.groups.shape[0] * len(self.bandwidths))

    def grad_rtol(self) -> float:
        chained = any(src != plan.DIRECT_EXP for src in plan.build_plan(self.bandwidths).src)
        return GRAD_RTOL_CHAINED if chained else GRAD_RTOL_DIRECT_EXP

    def run_kernel(self, op: str, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        plan_args = plan.build_plan(self.bandwidths).as_op_args()
        if op == "shuffle":
            return triton_kernels.mmd_shuffle_triton(
                self.z, self.perms, self.groups, *plan_args, list(self.weights), compute_grad
            )
        return triton_kernels.mmd_dhsic_triton(self.z, self.groups, *plan_args, compute_grad)


def _check_against_reference(case: Case, op: str, compute_grad: bool) -> None:
    loss, grad = case.run_kernel(op, compute_grad)
    assert loss.dtype == torch.float32 and loss.shape == ()
    ref_loss, ref_grad = case.reference_with_grad(op, torch.float64)
    loss_tol = LOSS_RTOL * abs(ref_loss) + LOSS_ATOL_PER_SCALE * case.loss_scale(op)
    assert abs(loss.item() - ref_loss) <= loss_tol, f"loss {loss.item()} vs reference {ref_loss} (tol {loss_tol:.3g})"
    if not compute_grad:
        assert grad.shape == (0,)
        return
    assert grad.dtype == torch.float32 and grad.shape == case.z.shape
    assert torch.isfinite(grad).all(), "the kernel left unwritten (NaN) gradient entries"
    _, f32_grad = case.reference_with_grad(op, torch.float32)
    f32_err = (f32_grad - ref_grad).abs().max().item()
    grad_tol = max(case.grad_rtol() * ref_grad.abs().max().item(), GRAD_F32_FACTOR * f32_err) + GRAD_ATOL
    grad_err = (grad.double() - ref_grad).abs().max().item()
    assert grad_err <= grad_tol, f"grad max error {grad_err:.3g} > {grad_tol:.3g} (float32 reference: {f32_err:.3g})"


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


def test_chain_sentinels_match_plan():
    assert triton_kernels.DIRECT_EXP.value == plan.DIRECT_EXP
    assert triton_kernels.FROM_BASE.value == plan.FROM_BASE
    assert triton_kernels.MAX_BANDWIDTHS == plan.MAX_BANDWIDTHS
    assert plan.MAX_CHAIN_POWER < 2**triton_kernels.MAX_STEP_BITS.value


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
    shape = {**triton_kernels._shape_kwargs(z), "BLOCK_D": triton_kernels._grad_block_d(z)}
    chained, direct = (
        triton_kernels._plan_kwargs(triton_kernels._make_plan(*plan.build_plan(bandwidths).as_op_args()))
        for bandwidths in (reference.DEFAULT_BANDWIDTHS, DIRECT_BANDWIDTHS)
    )
    shuffle_flags = [
        dict(SYMMETRIC=True, COMPUTE_GRAD=True, ACCUMULATE_GRAD=False),
        dict(SYMMETRIC=False, COMPUTE_GRAD=False, ACCUMULATE_GRAD=True),
    ]
    launches = [
        (triton_kernels._shuffle_term_kernel, {**bandwidths, **shape, **flags})
        for bandwidths, flags in zip((chained, direct), shuffle_flags)
    ]
    launches += [
        (triton_kernels._dhsic_sums_kernel, {**chained, **shape}),
        (triton_kernels._dhsic_grad_kernel, {**direct, **shape}),
    ]
    for kernel, constexprs in launches:
        constexprs = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
        signature = {param.name: _param_type(param, constexprs) for param in kernel.params}
        triton.compile(
            ASTSource(kernel, signature, constexprs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": triton_kernels.NUM_WARPS},
        )


if __name__ == "__main__" and sys.argv[1:] == ["--compile-sm90"]:
    _compile_kernels_for_sm90()
