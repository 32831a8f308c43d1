"""The GPU backends (CUDA kernel, compiled Triton) against the float64 reference on the same device and permutations.

Runs only where a CUDA device is present (the project's GPU check script: benchmarks/gpu_check.sh)."""

import pytest
import torch
from mmd_cases import (
    OPTIONS,
    assert_close_to_reference,
    assert_loss_close,
    loss_scale,
    make_input,
    option_id,
    run,
    valid,
)

import mmdkernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

BACKENDS = ["cuda", "triton"]
SHAPES = [(1, 1, 1, 2), (2, 2, 3, 5), (3, 4, 17, 11), (4, 4, 32, 129), (2, 8, 16, 261), (8, 4, 128, 100)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_gpu_backend_matches_reference(backend, shape, options):
    if not valid(shape, options):
        pytest.skip(reason=f"{shape} is not a valid input for {options}")
    assert_close_to_reference(make_input(shape, device="cuda"), backend, **options)  # the GPU exp's chain floor


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_inputs(backend, dtype):
    """Standardised and reduced in float32, the gradient rounded to the input dtype: the rule, with PyTorch's
    reference on the same rounded input doing the same."""
    assert_close_to_reference(make_input((4, 4, 32, 60), dtype, device="cuda"), backend)


def test_gpu_default_dispatch_is_cuda_kernel_and_matches_cpu_kernel():
    """dHSIC has no randomness: the CUDA kernel (the default on CUDA tensors) and the C++ CPU kernel both obey the
    rule against the same float64 reference (two kernels, two summation orders: not bit for bit)."""
    x = make_input((4, 4, 32, 60), device="cuda")
    gpu = mmdkernels.mmd_loss(x, estimator="dhsic")
    cpu = mmdkernels.mmd_loss(x.cpu(), estimator="dhsic", backend="cpp")
    loss64, loss32 = (run(x.cpu(), "reference", dtype, estimator="dhsic")[0] for dtype in (torch.float64, None))
    for loss, name in ((gpu, "default (CUDA) dHSIC"), (cpu, "cpp dHSIC")):
        assert_loss_close(loss.cpu(), loss64, loss32, loss_scale(x.cpu(), estimator="dhsic"), name=name)


def test_gpu_generator_must_match_device():
    with pytest.raises(ValueError, match="generator is on cpu but x is on cuda"):
        mmdkernels.mmd_loss(make_input((2, 2, 4, 10), device="cuda"), generator=torch.Generator())


def test_gpu_triton_full_plane_walk_is_reproducible():
    """Under torch.use_deterministic_algorithms(True) the Triton kernels walk every tile of the symmetric planes
    without atomics, so two runs agree bit for bit (by default mirrored tiles add their column sides by atomics)."""
    from mmdkernels.mmd import ops
    from mmdkernels.mmd import reference as ref
    from mmdkernels.mmd.plan import build_plan

    g = torch.Generator().manual_seed(5)
    z = ref.standardize(torch.randn(300, 3, 20, generator=g)).contiguous().cuda()
    perms = torch.stack([torch.randperm(300, generator=g) for _ in range(3)]).cuda()
    groups = ref.codebook_groups(3, "pairwise", device="cuda")
    plan = build_plan(ref.DEFAULT_BANDWIDTHS).as_op_args()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for op, args in ((ops.shuffle_op("triton"), (z, perms, groups, *plan, [1e-3, 1e-3, -2e-3], True)),
                         (ops.dhsic_op("triton"), (z, groups, *plan, True))):
            (loss_a, grad_a), (loss_b, grad_b) = (op(*args) for _ in range(2))
            assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    finally:
        torch.use_deterministic_algorithms(before)
