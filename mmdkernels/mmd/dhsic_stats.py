"""The dHSIC statistics between the two passes (docs/mmd_kernels.md, "mmd_dhsic"): the loss and the gradient terms
gamma and beta from the pass-1 sums, for the Triton backend. The same sequence of tensor ops as `dhsic_statistics`
in csrc/mmd/dhsic_stats.h, which the C++ CPU and CUDA ops use: one formula for every backend (tests/
test_opcheck_mmd.py checks that the C++ op's loss from given sums equals this one's).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class DhsicStats(NamedTuple):
    loss: torch.Tensor  # float32 []
    gamma: torch.Tensor | None  # float32 [K, A], contiguous (None without the gradient terms)
    beta: torch.Tensor | None  # float32 [K, A, N], contiguous (None without the gradient terms)


def dhsic_statistics(
    sums: torch.Tensor, groups: torch.Tensor, num_bandwidths: int, with_gradient_terms: bool
) -> DhsicStats:
    """Loss, gamma_{k,a} and beta_{k,a}(n) from the pass-1 sums, in float64 (O(G A N) work).

    Args:
        sums: float64 [K*A + 1, N], the pass-1 sums of ALL rows: row k*A + a is sum_m E_{k,a}(n, m); the last row's
            total is the joint sum (the contract of mmdkernels::mmd_dhsic_sums).
        groups: [G, K] 0/1 codebook groups on the same device.
        num_bandwidths: A.
        with_gradient_terms: also compute gamma and beta (pass 2 needs them).
    Returns:
        DhsicStats(loss float32 [], gamma float32 [K, A], beta float32 [K, A, N]).

    Products over a group's codebooks are exp(groups @ log(.)): every row mean is >= 1/N (E = 1 on the diagonal), so
    the logs are finite, and prod_{i in g, i != k} is the group's product divided by the k-th factor.
    """
    num_samples = sums.shape[1]
    num_groups, num_codebooks = groups.shape
    row_sums = sums.narrow(0, 0, num_codebooks * num_bandwidths).view(num_codebooks, num_bandwidths, num_samples)
    joint_total = sums.select(0, num_codebooks * num_bandwidths).sum()

    n = float(num_samples)
    row_means = row_sums / n  # rbar [K, A, N]
    means = row_means.mean(-1)  # s [K, A]
    membership = groups.ne(0).to(torch.float64)  # [G, K]
    mean_products = membership.mm(means.log()).exp()  # [G, A]
    cross_sum = torch.zeros((), dtype=torch.float64, device=sums.device)
    beta = None
    if with_gradient_terms:
        beta = torch.empty((num_codebooks, num_bandwidths, num_samples), dtype=torch.float64, device=sums.device)
    # Chunks over n bound the [G, A, chunk] product tensor (G = K (K - 1) / 2 in pairwise mode).
    chunk = max(1, (1 << 24) // max(1, num_groups * num_bandwidths))
    for n0 in range(0, num_samples, chunk):
        length = min(chunk, num_samples - n0)
        rbar = row_means.narrow(2, n0, length)
        row_products = membership.mm(rbar.log().reshape(num_codebooks, num_bandwidths * length)).exp()  # [G, A * len]
        cross_sum += row_products.sum()
        if with_gradient_terms:
            # sum over the groups containing k of prod_{i in g} rbar_i, over rbar_k
            products = membership.t().mm(row_products).view(num_codebooks, num_bandwidths, length)
            beta.narrow(2, n0, length).copy_(products / rbar * (2.0 / (n * n)))
    loss = (joint_total / (n * n) + mean_products.sum() - cross_sum * (2.0 / n)).to(torch.float32)
    if not with_gradient_terms:
        return DhsicStats(loss, None, None)
    gamma = (membership.t().mm(mean_products) / means / (n * n)).to(torch.float32).contiguous()
    return DhsicStats(loss, gamma, beta.to(torch.float32).contiguous())
