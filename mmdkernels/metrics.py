"""Codebook-dependence metrics: how far RVQ codes are from the independence that delay-pattern LMs assume.

A music LM with the delay pattern predicts the K codes of one decoding step as a product of per-codebook
marginals, so any statistical dependence between codebooks is modelling error. These measures quantify it from
discrete codes [B, K, T] (what `mmdkernels.mmd_loss` trains away in the continuous domain). Every (b, t) is one
sample of the K-tuple (c_1, ..., c_K); with delay=True the codes are first aligned as
`mmdkernels.mmd.reference.delay_align` aligns the continuous outputs, so a sample holds the K codes one decoding
step predicts together. All values are in nats.

Measures:
    entropy H(c_i):                    -sum_v p(v) log p(v) over the empirical distribution of codebook i.
    mutual information I(c_i; c_j):    H(c_i) + H(c_j) - H(c_i, c_j), from the co-occurrence counts of (c_i, c_j).
    normalized mutual information:     I(c_i; c_j) / sqrt(H(c_i) H(c_j)) (geometric-mean normalisation), in [0, 1].
    total correlation:                 sum_k H(c_k) - H(c_1, ..., c_K), zero iff the codebooks are jointly
                                       independent (it also catches dependence that no pair shows).

Bias correction: the plug-in entropy (empirical frequencies) underestimates H by about (m - 1) / (2N) for m
occupied bins and N samples, so plug-in MI of independent codes is positive, about (C - 1)^2 / (2N) for C
equiprobable entries. bias_correction="miller_madow" (the default) uses H_MM = H_plugin + (m - 1) / (2N) for every
entropy term: it removes that O(1/N) bias term, so MI of independent codes is ~0 (and can be slightly negative:
it is a bias-reduced estimate, not a bound). It does not fix the undersampled regime (m comparable to N), where
higher-order bias terms dominate. bias_correction="none" gives the plug-in values.
"""

from __future__ import annotations

import math

import torch

BIAS_CORRECTIONS = ("miller_madow", "none")
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_MAX_BINCOUNT_BINS = 1 << 24  # beyond this a dense count table costs more than sorting the keys

__all__ = [
    "BIAS_CORRECTIONS",
    "delay_align_codes",
    "pairwise_mutual_information",
    "normalized_mutual_information",
    "total_correlation",
    "dependence_report",
]


def _check_codes_tensor(codes: torch.Tensor) -> None:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor of shape [B, K, T], got {type(codes).__name__}")
    if codes.dtype not in INTEGER_DTYPES:
        raise TypeError(
            f"codes must be an integer tensor [B, K, T] (int64, int32, int16, int8 or uint8), got {codes.dtype}"
        )
    if codes.dim() != 3:
        raise ValueError(f"codes must have shape [B, K, T] (3 dims), got shape {tuple(codes.shape)}")


def delay_align_codes(codes: torch.Tensor) -> torch.Tensor:
    """Aligns codebook k by k frames, exactly as `mmdkernels.mmd.reference.delay_align` aligns [B, K, D, T].

    Args:
        codes: integer [B, K, T] with T > K.
    Returns:
        [B, K, T - K] with out[:, k, t] = codes[:, k, t + K - k]: one frame holds codes[:, k, s - k] for k = 0..K-1,
        the K codes that delay-pattern decoding step s = t + K predicts together.
    Raises:
        ValueError: if T <= K.
    """
    _check_codes_tensor(codes)
    num_codebooks, num_frames = codes.shape[1], codes.shape[2]
    if num_frames <= num_codebooks:
        raise ValueError(
            f"delay alignment needs T > K frames (it keeps T - K), got codes of shape {tuple(codes.shape)}"
        )
    return torch.stack([codes[:, k, num_codebooks - k : num_frames - k] for k in range(num_codebooks)], dim=1)


def _prepare(
    codes: torch.Tensor, num_entries: int | None, delay: bool, bias_correction: str
) -> tuple[torch.Tensor, int]:
    """Validates the arguments and returns the samples int64 [N, K] (n = b * T' + t) and the alphabet size C."""
    _check_codes_tensor(codes)
    if bias_correction not in BIAS_CORRECTIONS:
        raise ValueError(f"bias_correction must be one of {BIAS_CORRECTIONS}, got {bias_correction!r}")
    if num_entries is not None and (not isinstance(num_entries, int) or isinstance(num_entries, bool)):
        raise TypeError(f"num_entries must be an int or None, got {type(num_entries).__name__}")
    if num_entries is not None and num_entries < 1:
        raise ValueError(f"num_entries must be >= 1, got {num_entries}")
    if codes.shape[1] < 1:
        raise ValueError(f"codes must have K >= 1 codebooks, got shape {tuple(codes.shape)}")
    if delay:
        codes = delay_align_codes(codes)
    batch, num_codebooks, num_frames = codes.shape
    if batch * num_frames < 2:
        raise ValueError(
            f"codes must give at least 2 samples (B * T' >= 2, T' = T - K with delay=True), got {batch * num_frames}"
        )
    samples = codes.permute(0, 2, 1).reshape(batch * num_frames, num_codebooks).to(torch.int64)
    low, high = int(samples.min()), int(samples.max())
    if low < 0 or (num_entries is not None and high >= num_entries):
        raise ValueError(f"codes must have values in [0, {num_entries or 'C'}), got values in [{low}, {high}]")
    return samples, high + 1 if num_entries is None else num_entries


def _key_counts(keys: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Counts of the non-negative int64 keys [N] < num_bins: torch.bincount, or torch.unique for huge tables."""
    if num_bins <= _MAX_BINCOUNT_BINS:
        return torch.bincount(keys, minlength=num_bins)
    return torch.unique(keys, return_counts=True)[1]


def _entropy_from_counts(counts: torch.Tensor, bias_correction: str) -> float:
    """Entropy in nats of the empirical distribution with the given bin counts (any shape; empty bins ignored)."""
    counts = counts[counts > 0].to(torch.float64)
    num_samples = float(counts.sum())
    probs = counts / num_samples
    entropy = float(-(probs * probs.log()).sum())
    if bias_correction == "miller_madow":
        entropy += (counts.numel() - 1) / (2.0 * num_samples)
    return entropy


def _marginal_entropies(samples: torch.Tensor, num_entries: int, bias_correction: str) -> list[float]:
    """H(c_k) for every column of samples int64 [N, K]. Returns K floats."""
    return [_entropy_from_counts(_key_counts(column, num_entries), bias_correction) for column in samples.T]


def _pair_entropy(samples: torch.Tensor, i: int, j: int, num_entries: int, bias_correction: str) -> float:
    """H(c_i, c_j) from the co-occurrence counts of the keys c_i * C + c_j."""
    keys = samples[:, i] * num_entries + samples[:, j]
    return _entropy_from_counts(_key_counts(keys, num_entries * num_entries), bias_correction)


def _joint_entropy(samples: torch.Tensor, bias_correction: str) -> float:
    """H(c_1, ..., c_K) from the counts of the distinct K-tuples (rows of samples [N, K])."""
    return _entropy_from_counts(torch.unique(samples, dim=0, return_counts=True)[1], bias_correction)


def _mi_matrix(samples: torch.Tensor, num_entries: int, bias_correction: str) -> torch.Tensor:
    """[K, K] float64 MI matrix from prepared samples [N, K] (diagonal = H(c_i))."""
    entropies = _marginal_entropies(samples, num_entries, bias_correction)
    num_codebooks = samples.shape[1]
    mi = torch.diag(torch.tensor(entropies, dtype=torch.float64))
    for i in range(num_codebooks):
        for j in range(i + 1, num_codebooks):
            pair = _pair_entropy(samples, i, j, num_entries, bias_correction)
            mi[i, j] = mi[j, i] = entropies[i] + entropies[j] - pair
    return mi


def _normalize(mi: torch.Tensor) -> torch.Tensor:
    """MI [K, K] (diagonal = entropies) -> MI / sqrt(H_i H_j), 0 wherever H_i or H_j is 0."""
    entropies = mi.diagonal()
    scale = torch.sqrt(entropies[:, None] * entropies[None, :])
    return torch.where(scale > 0, mi / scale.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(mi))


def pairwise_mutual_information(
    codes: torch.Tensor,
    num_entries: int | None = None,
    *,
    delay: bool = False,
    bias_correction: str = "miller_madow",
) -> torch.Tensor:
    """Mutual information in nats between every pair of codebooks, over all N = B * T' samples (b, t).

    I(c_i; c_j) = H_i + H_j - H_ij with every entropy estimated from counts (torch.bincount of c_i * C + c_j for
    the pair) and, by default, Miller-Madow corrected: H_MM = H_plugin + (m - 1) / (2N), m the number of non-empty
    bins. The correction removes the O(1/N) bias of the plug-in estimator, so MI of independent codes is ~0 (it can
    be slightly negative); the plug-in MI of independent codes is ~(C - 1)^2 / (2N) instead.

    Args:
        codes: integer [B, K, T], values in [0, num_entries).
        num_entries: codebook size C; None takes max(codes) + 1.
        delay: align codebook k by k frames first (`delay_align_codes`; needs T > K).
        bias_correction: "miller_madow" or "none" (plug-in).
    Returns:
        float64 [K, K] on the CPU, symmetric; the diagonal holds the entropies H(c_i).
    """
    samples, num_entries = _prepare(codes, num_entries, delay, bias_correction)
    return _mi_matrix(samples, num_entries, bias_correction)


def normalized_mutual_information(
    codes: torch.Tensor,
    num_entries: int | None = None,
    *,
    delay: bool = False,
    bias_correction: str = "miller_madow",
) -> torch.Tensor:
    """Mutual information normalised by the geometric mean of the entropies: I(c_i; c_j) / sqrt(H_i H_j).

    1 for codebooks that determine each other (one is a bijection of the other), ~0 for independent ones (slightly
    negative values are possible with the Miller-Madow correction). Arguments as `pairwise_mutual_information`.

    Returns:
        float64 [K, K] on the CPU: 1 on the diagonal, 0 in every row and column of a constant codebook (H = 0).
    """
    return _normalize(pairwise_mutual_information(codes, num_entries, delay=delay, bias_correction=bias_correction))


def total_correlation(
    codes: torch.Tensor,
    num_entries: int | None = None,
    *,
    delay: bool = False,
    bias_correction: str = "miller_madow",
) -> float:
    """Total correlation sum_k H(c_k) - H(c_1, ..., c_K) in nats (0 iff the codebooks are jointly independent).

    The joint entropy comes from the counts of the distinct K-tuples over the N = B * T' samples (T' = T - K with
    delay=True, else T). Warning: with C^K possible tuples and C^K >> N most tuples are never seen, the joint
    entropy is capped near log N and the total correlation is strongly biased upwards for independent codes, even
    after the Miller-Madow correction (which only removes the O(1/N) term). Trust it when N >> C^K, or compare it
    across codecs at equal N. Arguments as `pairwise_mutual_information`.

    Returns:
        the total correlation as a Python float (0.0 for K = 1).
    """
    samples, num_entries = _prepare(codes, num_entries, delay, bias_correction)
    return _total_correlation(samples, num_entries, bias_correction)


def _total_correlation(samples: torch.Tensor, num_entries: int, bias_correction: str) -> float:
    if samples.shape[1] == 1:
        return 0.0
    marginals = _marginal_entropies(samples, num_entries, bias_correction)
    return math.fsum(marginals) - _joint_entropy(samples, bias_correction)


def dependence_report(codes: torch.Tensor, num_entries: int | None = None, *, delay: bool = False) -> dict:
    """All the measures at once, Miller-Madow corrected, as a JSON-friendly dict (lists, floats, ints, None).

    Args:
        codes: integer [B, K, T], values in [0, num_entries).
        num_entries: codebook size C; None takes max(codes) + 1.
        delay: align codebook k by k frames first (needs T > K).
    Returns:
        {"mutual_information": K x K nested lists (nats, diagonal = entropies),
         "normalized_mutual_information": K x K nested lists,
         "mean_offdiag_mutual_information", "mean_offdiag_normalized_mutual_information": floats (None for K = 1),
         "total_correlation": float (nats), "entropies": K floats,
         "num_samples", "num_codebooks", "num_entries": ints, "delay": bool, "bias_correction": "miller_madow"}
    """
    bias_correction = "miller_madow"
    samples, num_entries = _prepare(codes, num_entries, delay, bias_correction)
    mi = _mi_matrix(samples, num_entries, bias_correction)
    nmi = _normalize(mi)
    num_codebooks = samples.shape[1]
    off_diagonal = ~torch.eye(num_codebooks, dtype=torch.bool)
    has_pairs = num_codebooks > 1
    return {
        "mutual_information": mi.tolist(),
        "normalized_mutual_information": nmi.tolist(),
        "mean_offdiag_mutual_information": float(mi[off_diagonal].mean()) if has_pairs else None,
        "mean_offdiag_normalized_mutual_information": float(nmi[off_diagonal].mean()) if has_pairs else None,
        "total_correlation": _total_correlation(samples, num_entries, bias_correction),
        "entropies": mi.diagonal().tolist(),
        "num_samples": samples.shape[0],
        "num_codebooks": num_codebooks,
        "num_entries": num_entries,
        "delay": bool(delay),
        "bias_correction": bias_correction,
    }
