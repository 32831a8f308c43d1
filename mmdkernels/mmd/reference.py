"""Plain-PyTorch MMD independence loss: the spec that every fused kernel is tested against.

Everything here materialises N x N matrices on purpose: it is short, float64-capable and obviously right.

Pipeline (shared by every backend):
    x [B, K, D, T] --delay_align--> [B, K, D, T'] --flatten_samples--> [N, K, D] --standardize--> z
and then one of two estimators on z:
    shuffle: MMD between the joint samples X = z and Y, where codebook k of Y is z permuted by perms[k]
    dhsic:   the dHSIC V-statistic (Pfister et al. 2018), the shuffle-free estimate of the same quantity
Both are summed over codebook *groups*: one group of all K codebooks (mode="joint"), or every pair i<j
(mode="pairwise"), and over the Gaussian bandwidths a, with kernel exp(-d^2 / (2a)).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch

DEFAULT_BANDWIDTHS = (0.1, 1.0, 5.0, 10.0, 20.0, 50.0)
STANDARDIZE_EPS = 1e-8
MODES = ("joint", "pairwise")
ESTIMATORS = ("shuffle", "dhsic")
NORMALIZATIONS = ("unbiased", "reference")


def delay_align(x: torch.Tensor) -> torch.Tensor:
    """Aligns codebook k by k frames as the published loss does.

    Args:
        x: [B, K, D, T] with T > K.
    Returns:
        [B, K, D, T - K]: out[:, k, :, t] = x[:, k, :, t + K - k], so one frame holds the K codes that one
        delay-pattern decoding step predicts together (the published code crops K frames, not K - 1).
    """
    num_codebooks, num_frames = x.shape[1], x.shape[3]
    return torch.stack([x[:, k, :, num_codebooks - k : num_frames - k] for k in range(num_codebooks)], dim=1)


def flatten_samples(x: torch.Tensor) -> torch.Tensor:
    """[B, K, D, T] -> [N = B*T, K, D], sample n = b*T + t (the published ordering)."""
    batch, num_codebooks, dim, num_frames = x.shape
    return x.permute(0, 3, 1, 2).reshape(batch * num_frames, num_codebooks, dim)


def standardize(samples: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """Standardises every feature over the samples: (s - mean) / sqrt(unbiased var + eps). [N, ...] -> [N, ...]."""
    mean = samples.mean(dim=0, keepdim=True)
    var = samples.var(dim=0, keepdim=True)
    return (samples - mean) / torch.sqrt(var + eps)


def prepare_samples(x: torch.Tensor, delay: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [B, K, D, T] -> standardised samples z [N, K, D] in `dtype` (default float32, float64 stays float64)."""
    if dtype is None:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    if delay:
        x = delay_align(x)
    return standardize(flatten_samples(x))


def draw_permutations(
    num_samples: int, num_codebooks: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """One torch.randperm(N) per codebook, k = 0..K-1 in order (the published RNG use). Returns int64 [K, N]."""
    return torch.stack([torch.randperm(num_samples, generator=generator, device=device) for _ in range(num_codebooks)])


def codebook_groups(num_codebooks: int, mode: str, device: torch.device | None = None) -> torch.Tensor:
    """The codebook groups the loss sums over, as a 0/1 int32 mask [G, K].

    joint: one group of all K codebooks. pairwise: one group per pair i < j (G = K(K-1)/2).
    """
    if mode == "joint":
        return torch.ones(1, num_codebooks, dtype=torch.int32, device=device)
    rows = []
    for i, j in itertools.combinations(range(num_codebooks), 2):
        row = [0] * num_codebooks
        row[i] = row[j] = 1
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, num_codebooks)


def shuffle_codebooks(z: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Product-of-marginals samples: y[:, k] = z[perms[k], k]. z [N, K, D], perms int64 [K, N] -> [N, K, D]."""
    return torch.stack([z[perms[k], k] for k in range(z.shape[1])], dim=1)


def codebook_sqdists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-codebook squared distances: a [N, K, D], b [M, K, D] -> [K, N, M], via |a|^2 + |b|^2 - 2 a.b."""
    a_k, b_k = a.transpose(0, 1), b.transpose(0, 1)
    dots = torch.bmm(a_k, b_k.transpose(1, 2))
    norms_a = (a_k * a_k).sum(-1)
    norms_b = (b_k * b_k).sum(-1)
    return (norms_a[:, :, None] + norms_b[:, None, :] - 2.0 * dots).clamp_min(0.0)


def group_sqdists(per_codebook: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Sums per-codebook distances [K, N, M] over each group [G, K] -> [G, N, M]."""
    return torch.einsum("gk,knm->gnm", groups.to(per_codebook.dtype), per_codebook)


def exponent_coefs(bandwidths: Sequence[float]) -> list[float]:
    """Kernel exp(-d^2 / (2a)) = exp(-coef * d^2) with coef = 1 / (2a)."""
    return [0.5 / float(a) for a in bandwidths]


def shuffle_sums_ref(
    z: torch.Tensor,
    perms: torch.Tensor,
    groups: torch.Tensor,
    bandwidths: Sequence[float],
    term_weights: Sequence[float],
) -> torch.Tensor:
    """What the fused shuffle kernels compute (loss only; gradients by autograd).

    Returns the scalar  sum_{g, a} [ w_xx S_xx + w_yy S_yy + w_xy S_xy ]  where, with D_g the group distance,
    S_xx = sum_{n != m} exp(-coef_a D_g(x_n, x_m)), S_yy likewise over y, S_xy = sum_{n, m} exp(-coef_a D_g(x_n, y_m)).
    """
    y = shuffle_codebooks(z, perms)
    w_xx, w_yy, w_xy = term_weights
    off_diagonal = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    total = z.new_zeros(())
    for weight, a, b, symmetric in ((w_xx, z, z, True), (w_yy, y, y, True), (w_xy, z, y, False)):
        dists = group_sqdists(codebook_sqdists(a, b), groups)
        for coef in exponent_coefs(bandwidths):
            kernel = torch.exp(-coef * dists)
            if symmetric:
                kernel = kernel * off_diagonal
            total = total + weight * kernel.sum()
    return total


def dhsic_ref(z: torch.Tensor, groups: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """dHSIC V-statistic of each codebook group, summed over groups and bandwidths (what the dHSIC kernels compute).

    For a group g and bandwidth a, with E_k = exp(-coef_a d_k) the Gram matrix of codebook k:
        mean_{n,m} prod_{k in g} E_k  +  prod_{k in g} mean_{n,m} E_k  -  2 mean_n prod_{k in g} mean_m E_k
    It equals the V-statistic MMD^2 between the empirical joint and the empirical product of marginals, i.e. the
    shuffle estimator averaged over all permutations.
    """
    per_codebook = codebook_sqdists(z, z)
    total = z.new_zeros(())
    for coef in exponent_coefs(bandwidths):
        grams = torch.exp(-coef * per_codebook)
        row_means = grams.mean(dim=2)  # [K, N]
        means = row_means.mean(dim=1)  # [K]
        for mask in groups.bool():
            joint = grams[mask].prod(dim=0).mean()
            product_of_means = means[mask].prod()
            cross = 2.0 * row_means[mask].prod(dim=0).mean()
            total = total + joint + product_of_means - cross
    return total


def normalization_weights(
    normalization: str, num_samples: int, batch_size: int, num_groups: int, num_bandwidths: int
) -> tuple[tuple[float, float, float], float]:
    """(w_xx, w_yy, w_xy) and the additive constant of the shuffle estimator.

    unbiased:  S_xx / (N(N-1)) + S_yy / (N(N-1)) - 2 S_xy / N^2.
    reference: the published normalisation by the batch size B, whose diagonal terms (N of them, minus B) survive
               as the constant 2 (N - B) / (B (B - 1)) per group and bandwidth.
    """
    if normalization == "unbiased":
        n = float(num_samples)
        return (1.0 / (n * (n - 1.0)), 1.0 / (n * (n - 1.0)), -2.0 / (n * n)), 0.0
    b = float(batch_size)
    constant = num_groups * num_bandwidths * 2.0 * (num_samples - b) / (b * (b - 1.0))
    return (1.0 / (b * (b - 1.0)), 1.0 / (b * (b - 1.0)), -2.0 / (b * b)), constant


def shuffle_loss(term_sums: torch.Tensor, normalization: str, constant: float) -> torch.Tensor:
    """The shuffle estimator's loss from its weighted term sums (shuffle_sums_ref or a fused kernel's): plus the
    normalisation's constant, clamped at 0 for normalization="reference" (the published code's clamp). Every path
    (reference, fused, distributed) finishes the loss here.

    Args:
        term_sums: 0-dim, w_xx S_xx + w_yy S_yy + w_xy S_xy with the weights of normalization_weights.
        normalization: "unbiased" or "reference".
        constant: the additive constant that normalization_weights returned.
    """
    loss = term_sums + constant
    return loss.clamp(min=0) if normalization == "reference" else loss


def mmd_loss_ref(
    x: torch.Tensor,
    *,
    delay: bool = False,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    mode: str = "joint",
    estimator: str = "shuffle",
    normalization: str = "unbiased",
    generator: torch.Generator | None = None,
    perms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference multi-kernel MMD independence loss (see the module docstring). Arguments as `mmdkernels.mmd_loss`.

    Args:
        x: [B, K, D, T] per-codebook quantized outputs (any float dtype; computed in float32, float64 kept).
        perms: optional int64 [K, N] permutations to use instead of drawing them (tests pass the kernels' ones).
    Returns:
        0-dim tensor in the computation dtype, differentiable w.r.t. x.
    """
    batch, num_codebooks = x.shape[0], x.shape[1]
    z = prepare_samples(x, delay)
    num_samples = z.shape[0]
    groups = codebook_groups(num_codebooks, mode, device=z.device)
    if estimator == "dhsic":
        return dhsic_ref(z, groups, bandwidths)
    if perms is None:
        perms = draw_permutations(num_samples, num_codebooks, generator, z.device)
    weights, constant = normalization_weights(normalization, num_samples, batch, groups.shape[0], len(bandwidths))
    return shuffle_loss(shuffle_sums_ref(z, perms, groups, bandwidths, weights), normalization, constant)
