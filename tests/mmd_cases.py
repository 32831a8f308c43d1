"""Shared MMD test cases: inputs, options, and the comparison with the float64 reference (any device)."""

from __future__ import annotations

import tolerances
import torch
from tolerances import EPS32, FACTOR, table_floor

import mmdkernels
from mmdkernels.mmd import reference as ref
from mmdkernels.mmd.plan import DIRECT_EXP, build_plan

# The kernels' exp (csrc/mmd/mmd_tile.h): on the host a polynomial with relative error up to ~2e-7, on a GPU __expf
# (2 ulp). With a bandwidth chain (plan.py) exp(-coef d) is v ** p for v = exp(-base d): the power multiplies v's
# relative error, and the chain's own multiplies add about one rounding more (see chain_floor).
EXP_REL_ERROR = {"cpu": 2e-7, "cuda": 2 * EPS32}


def chain_floor(bandwidths=ref.DEFAULT_BANDWIDTHS, device="cpu") -> float:
    """Relative error the bandwidth chain adds to a kernel value (so to a gradient, relative to its largest entry):
    max power x (exp's relative error + u for the multiplies); 0 where every bandwidth gets its own exp. A property
    of the algorithm, which PyTorch's baseline (one correctly rounded exp per bandwidth) does not carry."""
    plan = build_plan(bandwidths)
    if all(src == DIRECT_EXP for src in plan.src):
        return 0.0
    max_power = round(max(plan.coefs) / plan.base_coef)
    return max_power * (EXP_REL_ERROR[torch.device(device).type] + EPS32 / 2)


def mmd_grad_floor(bandwidths=ref.DEFAULT_BANDWIDTHS, device="cpu", dtype=torch.float32) -> float:
    """The gradient floor of the rule for the MMD kernels: the table's, plus the chain's (relative to max |grad|)."""
    return table_floor(dtype, "gradient") + chain_floor(bandwidths, device)


# The constants tests/test_mmd_distributed.py imports, from the same rule.
RULE_FACTOR = FACTOR
LOSS_RTOL = table_floor(torch.float32)  # x |loss|: the published normalisation adds a large constant
LOSS_FLOOR = 4 * LOSS_RTOL  # x (bandwidths x groups): the unbiased weights of a term's kernel means sum to 4
GRAD_FLOOR_CPU = mmd_grad_floor()  # default bandwidths
GRAD_FLOOR_GPU = mmd_grad_floor(device="cuda")

OPTIONS = [
    dict(mode="joint", estimator="shuffle"),
    dict(mode="pairwise", estimator="shuffle"),
    dict(mode="joint", estimator="dhsic"),
    dict(mode="pairwise", estimator="dhsic"),
    dict(mode="joint", estimator="shuffle", normalization="reference"),
]


def option_id(options: dict) -> str:
    return "-".join(options.values())


def make_input(shape, dtype=torch.float32, duplicates=True, seed=0, device="cpu") -> torch.Tensor:
    """Random codebook outputs with a shared component (so codebooks are dependent) and exact duplicate frames."""
    g = torch.Generator().manual_seed(seed)
    batch, num_codebooks, dim, num_frames = shape
    shared = torch.randn(batch, 1, dim, num_frames, generator=g)
    x = 0.7 * torch.randn(shape, generator=g) + shared
    if duplicates and num_frames > 2:
        x[..., 1] = x[..., 0]  # quantized outputs repeat: exact duplicates must be handled (d = 0)
    return x.to(dtype).to(device)


def valid(shape, options, delay=False) -> bool:
    batch, num_codebooks, _, num_frames = shape
    if options["mode"] == "pairwise" and num_codebooks < 2:
        return False
    if options.get("normalization") == "reference" and batch < 2:
        return False
    frames = num_frames - num_codebooks if delay else num_frames
    return frames >= 1 and batch * frames >= 2


def run(x, backend, dtype=None, seed=7, **kwargs):
    """(loss, grad) as float64, for `backend` (or "reference") on x converted to dtype, seeded on x's device."""
    leaf = x.detach().to(dtype or x.dtype).requires_grad_()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    if backend == "reference":
        loss = ref.mmd_loss_ref(leaf, generator=generator, **kwargs)
    else:
        loss = mmdkernels.mmd_loss(leaf, generator=generator, backend=backend, **kwargs)
    loss.backward()
    return loss.detach().double(), leaf.grad.double()


def loss_scale(
    x,
    seed=7,
    delay=False,
    bandwidths=ref.DEFAULT_BANDWIDTHS,
    mode="joint",
    estimator="shuffle",
    normalization="unbiased",
    global_rng=False,
) -> float:
    """The size of the loss's terms before they cancel (the loss floor is relative to it), in float64: the shuffle
    estimator's kernel sums weighted by |weights| on run()'s permutations (global_rng=True: on those the global RNG
    seeded with `seed` draws, as for a call without a generator) plus |the normalisation's constant|; for dHSIC the
    three means of each term (joint + product + 2 cross, all >= 0)."""
    z = ref.prepare_samples(x.detach(), delay, torch.float64)
    groups = ref.codebook_groups(x.shape[1], mode, device=z.device)
    if estimator == "dhsic":
        per_codebook, total = ref.codebook_sqdists(z, z), 0.0
        for coef in ref.exponent_coefs(bandwidths):
            grams = torch.exp(-coef * per_codebook)
            row_means = grams.mean(dim=2)
            for mask in groups.bool():
                joint, means = grams[mask].prod(0).mean(), row_means[mask].mean(1).prod()
                total += joint + means + 2 * row_means[mask].prod(0).mean()
        return float(total)
    generator = None if global_rng else torch.Generator(device=x.device).manual_seed(seed)
    if global_rng:
        torch.manual_seed(seed)
    perms = ref.draw_permutations(z.shape[0], x.shape[1], generator, z.device)
    num_samples, num_groups = z.shape[0], groups.shape[0]
    weights, constant = ref.normalization_weights(normalization, num_samples, x.shape[0], num_groups, len(bandwidths))
    magnitudes = [abs(w) for w in weights]
    return float(ref.shuffle_sums_ref(z, perms, groups, bandwidths, magnitudes)) + abs(constant)


def assert_loss_close(loss, loss64, baseline, scale: float, name: str) -> None:
    """A float32 loss against float64 by the rule, the floor relative to loss_scale."""
    tolerances.assert_close_to_reference(loss, loss64, baseline, name=name, dtype=torch.float32, scale=scale)


def assert_close_to_reference(x, backend, grad_floor=None, **kwargs):
    """Kernel vs the float64 reference, by the rule of tests/tolerances.py. Baseline: the reference run by PyTorch on
    x as it is (bfloat16/float16 inputs: standardised and reduced in float32, the gradient rounded to x's dtype, as
    the kernels do). Loss floor relative to loss_scale; gradient floor (default mmd_grad_floor for the bandwidths,
    x's device and dtype) relative to max |grad|."""
    loss64, grad64 = run(x, "reference", torch.float64, **kwargs)
    loss_base, grad_base = run(x, "reference", **kwargs)
    loss, grad = run(x, backend, **kwargs)
    assert torch.isfinite(grad).all(), f"{backend}: non-finite gradient entries"
    assert_loss_close(loss, loss64, loss_base, loss_scale(x, **kwargs), name=f"{backend} loss")
    if grad_floor is None:
        grad_floor = mmd_grad_floor(kwargs.get("bandwidths", ref.DEFAULT_BANDWIDTHS), x.device, x.dtype)
    tolerances.assert_close_to_reference(
        grad, grad64, grad_base, name=f"{backend} gradient", kind="gradient", dtype=x.dtype, floor=grad_floor
    )
