"""MMDLoss reproduces the published EnCodec-MMD loss (audiocraft fork, 2024) under the same seed."""

import pytest
import torch
from mmd_cases import mmd_grad_floor
from tolerances import assert_close_to_reference

import mmdkernels
from mmdkernels.mmd import reference as ref


def published_formula(inputs: torch.Tensor, delay: bool, dtype=torch.float32, magnitude=False) -> torch.Tensor:
    """The published loss, rewritten here from its description as the test oracle (materialised; float32 as
    published, float64 as the reference). magnitude=True: the sum of its terms' sizes instead (the rule's scale)."""
    batch, num_codebooks, dim, num_frames = inputs.shape
    x = inputs.to(dtype)
    if delay:
        padded = [torch.nn.functional.pad(x[:, k : k + 1, :, : num_frames - k], (k, 0)) for k in range(num_codebooks)]
        x = torch.cat(padded, dim=1)[..., num_codebooks:]
    x = x.permute(0, 3, 1, 2).reshape(-1, num_codebooks, dim)
    x = (x - x.mean(dim=0, keepdim=True)) / torch.sqrt(x.var(dim=0, keepdim=True) + 1e-8)
    y = torch.zeros_like(x)
    for k in range(num_codebooks):
        y[:, k] = x[torch.randperm(x.shape[0]), k]
    x, y = x.reshape(x.shape[0], -1), y.reshape(x.shape[0], -1)
    xx, yy, xy = x @ x.t(), y @ y.t(), x @ y.t()
    rx, ry = xx.diag()[None], yy.diag()[None]
    dxx, dyy, dxy = rx.t() + rx - 2 * xx, ry.t() + ry - 2 * yy, rx.t() + ry - 2 * xy
    out = 0.0
    sign = 1 if magnitude else -1
    for a in (0.1, 1, 5, 10, 20, 50):
        out += (torch.exp(-0.5 / a * dxx).sum() + sign * batch) / (batch * (batch - 1))
        out += 2 / batch**2 * torch.exp(-0.5 / a * dxy).sum() * sign
        out += (torch.exp(-0.5 / a * dyy).sum() + sign * batch) / (batch * (batch - 1))
    return out if magnitude else out.clamp(min=0)


def published_values(x: torch.Tensor, delay: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(float64 reference, float32 published computation, scale): the rule's three inputs, on the permutations that
    seeding the global RNG with `seed` draws."""
    values = []
    for dtype, magnitude in ((torch.float64, False), (torch.float32, False), (torch.float64, True)):
        torch.manual_seed(seed)
        values.append(published_formula(x, delay, dtype, magnitude))
    return values[0], values[1], float(values[2])


@pytest.mark.parametrize("delay", [False, True])
@pytest.mark.parametrize("shape", [(4, 4, 16, 20), (2, 3, 7, 9), (8, 2, 32, 6)])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_mmdloss_reproduces_published_values(shape, delay, backend):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) + 0.5 * torch.randn(
        shape[0], 1, shape[2], shape[3]
    )
    reference, published, scale = published_values(x, delay, seed=123)
    torch.manual_seed(123)
    got = mmdkernels.MMDLoss(delay=delay, backend=backend)(x)
    # same permutations (global RNG, one randperm(N) per codebook); float32 maths in another order: the rule, with the
    # published float32 computation as the baseline and the floor relative to the size of the terms
    assert_close_to_reference(got, reference, published, name=f"MMDLoss ({backend})", scale=scale)


def test_mmdloss_gradient_matches_published():
    x = torch.randn(4, 3, 8, 15, generator=torch.Generator().manual_seed(1))
    x_ref, x_pub, x_ours = x.double().requires_grad_(), x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)
    published_formula(x_ref, True, torch.float64).backward()
    torch.manual_seed(5)
    published_formula(x_pub, True).backward()
    torch.manual_seed(5)
    mmdkernels.MMDLoss(delay=True)(x_ours).backward()
    grads = (x_ours.grad, x_ref.grad, x_pub.grad)
    assert_close_to_reference(*grads, name="MMDLoss gradient", kind="gradient", floor=mmd_grad_floor())


def test_mmdloss_constructor_is_drop_in():
    crit = mmdkernels.MMDLoss(True, None)
    assert crit.delay and crit.normalization == "reference"
    assert "delay=True" in repr(crit)


def test_reference_normalization_constant_is_the_diagonal_remainder():
    """N != B: the published value carries 2 A (N - B) / (B (B - 1)) from the diagonal; the unbiased one does not."""
    x = torch.randn(3, 2, 4, 10)
    weights, constant = ref.normalization_weights("reference", 30, 3, 1, 6)
    assert constant == pytest.approx(2 * 6 * (30 - 3) / (3 * 2))
    assert weights == pytest.approx((1 / 6, 1 / 6, -2 / 9))
    unbiased = mmdkernels.mmd_loss(x, generator=torch.Generator().manual_seed(0))
    assert abs(unbiased.item()) < 1.0 < constant
