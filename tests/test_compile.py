"""torch.compile(fullgraph=True) traces the public ops without graph breaks (custom ops with fake implementations;
data-dependent value checks are skipped while compiling) and gives the eager results."""

import pytest
import torch
from mmd_cases import assert_loss_close, loss_scale, mmd_grad_floor
from tolerances import assert_close_to_reference

import mmdkernels
from mmdkernels.mmd.reference import mmd_loss_ref


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_rvq_encode_decode_fullgraph():
    g = torch.Generator().manual_seed(0)
    books = torch.randn(4, 64, 16, generator=g)
    x = torch.randn(2, 16, 30, generator=g)

    def encode_decode(latents):
        codes, quantized = mmdkernels.rvq_encode(latents, books, return_quantized=True)
        return codes, quantized, mmdkernels.rvq_decode(codes, books)

    compiled = torch.compile(encode_decode, fullgraph=True)
    for got, expected in zip(compiled(x), encode_decode(x)):
        assert torch.equal(got, expected)


def test_constant_marker_matches_torch():
    from mmdkernels import _ext

    def probe():
        return True

    marked = torch.compiler.assume_constant_result(probe)
    assert vars(marked), "torch no longer marks the function itself: update _ext.constant_under_compile"
    assert all(getattr(_ext.available, name, None) == value for name, value in vars(marked).items())


DTYPES = (torch.float64, torch.float32)  # the reference's, the kernels' (and the rule's baseline's)


def reference_loss_and_grad(x, dtype, estimator, seed=7):
    """The reference's loss and gradient on x in dtype, with the permutations of the global RNG seeded with seed."""
    leaf = x.detach().to(dtype).requires_grad_()
    torch.manual_seed(seed)
    loss = mmd_loss_ref(leaf, delay=True, estimator=estimator)
    return loss.detach(), torch.autograd.grad(loss, leaf)[0]


@pytest.mark.parametrize("estimator", ["dhsic", "shuffle"])
def test_mmd_loss_fullgraph_with_gradient(estimator):
    x = torch.randn(3, 4, 8, 20, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def loss_fn(q):
        return mmdkernels.mmd_loss(q, delay=True, estimator=estimator)

    compiled = torch.compile(loss_fn, fullgraph=True)
    torch.manual_seed(7)  # the shuffle estimator draws from the global RNG when no generator is given
    got = compiled(x)
    (got_grad,) = torch.autograd.grad(got, x)
    # inductor compiles the code around the fused op (delay, standardisation): another code path, so the rule against
    # the float64 reference on the same permutations (the same draws from the global RNG), PyTorch's float32 reference
    # as the baseline
    (loss64, grad64), (loss32, grad32) = (reference_loss_and_grad(x, dtype, estimator) for dtype in DTYPES)
    scale = loss_scale(x, seed=7, delay=True, estimator=estimator, global_rng=True)
    assert_loss_close(got, loss64, loss32, scale, name=f"compiled {estimator} loss")
    assert_close_to_reference(
        got_grad, grad64, grad32, name=f"compiled {estimator} gradient", kind="gradient", floor=mmd_grad_floor()
    )


def test_sample_and_rvq_in_one_graph():
    """A decoding step as a user would compile it: sampling with caller-drawn uniforms, then the RVQ decode."""
    books = torch.randn(4, 32, 8, generator=torch.Generator().manual_seed(2))
    logits = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(3))
    uniforms = torch.rand(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def step(scores, u):
        tokens = mmdkernels.sample(scores, top_k=5, uniforms=u)
        return tokens, mmdkernels.rvq_decode(tokens[:, :, None], books)

    compiled = torch.compile(step, fullgraph=True)
    for got, expected in zip(compiled(logits, uniforms), step(logits, uniforms)):
        assert torch.equal(got, expected)
