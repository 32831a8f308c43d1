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
higher-order bias terms dominate. bias_correction="none" gives the plug-in values. Both count estimates are
biased upwards in the undersampled regime (C^2 pairs of entries against N samples: at C = 256 and N = 6,000,
independent codes show ~2 nats): use them to compare codecs at equal N only.

heldout_mutual_information: the consistent estimate, a held-out cross-entropy difference (conditional vs marginal
model of c_j, fitted on training codes, scored on test codes) with a bootstrap interval over the test pieces: ~0 on
independent codes at any N, and approaching the true MI as the training set grows.
"""

from __future__ import annotations

import dataclasses
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
    "heldout_mutual_information",
    "HeldoutMutualInformation",
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


# ---------------------------------------------------------------------------------------------------------------
# Held-out (cross-entropy) mutual information
# ---------------------------------------------------------------------------------------------------------------

# Dirichlet pseudo-counts tried for q(c_j | c_i) (shrunk towards q(c_j)) and for q(c_j) (towards uniform); inf is
# the marginal itself, so independent codes can reach an estimate of exactly 0.
SMOOTHING_GRID = tuple(2.0**e for e in range(-6, 17)) + (math.inf,)
BOOTSTRAP_RESAMPLES = 2000
SMOOTHING_SPLIT = 0.2  # share of the training rows (pieces) that choose the smoothing


@dataclasses.dataclass
class HeldoutMutualInformation:
    """The result of `heldout_mutual_information` (float64 [K, K] tensors on the CPU, nats).

    estimate[i, j] (i != j): I(c_i; c_j) estimated as the held-out cross-entropy of c_j under its marginal minus its
    cross-entropy under q(c_j | c_i); estimate[i, i]: the held-out cross-entropy of c_i under its marginal (an upper
    bound on H(c_i)). low, high: the bootstrap percentile interval at `confidence`. conditional_smoothing[i, j]:
    the pseudo-count chosen for q(c_j | c_i) (inf: the marginal); marginal_smoothing [K]: that of q(c_j).
    """

    estimate: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    confidence: float
    conditional_smoothing: torch.Tensor
    marginal_smoothing: torch.Tensor
    num_train_samples: int
    num_test_samples: int
    num_test_rows: int
    mean_offdiagonal: tuple[float, float, float]  # (estimate, low, high) of the mean over the K (K - 1) ordered pairs

    def to_dict(self) -> dict:
        """JSON-friendly: nested lists and floats (inf smoothing as the string "inf")."""

        def finite(values):
            return [[v if math.isfinite(v) else "inf" for v in row] for row in values]

        return {
            "estimate": self.estimate.tolist(),
            "low": self.low.tolist(),
            "high": self.high.tolist(),
            "mean_offdiagonal": list(self.mean_offdiagonal),
            "confidence": self.confidence,
            "conditional_smoothing": finite(self.conditional_smoothing.tolist()),
            "marginal_smoothing": [v if math.isfinite(v) else "inf" for v in self.marginal_smoothing.tolist()],
            "num_train_samples": self.num_train_samples,
            "num_test_samples": self.num_test_samples,
            "num_test_rows": self.num_test_rows,
        }


def _rows_samples(codes: torch.Tensor, delay: bool) -> torch.Tensor:
    """codes [B, K, T] -> int64 [B, T', K] (delay-aligned when asked)."""
    if delay:
        codes = delay_align_codes(codes)
    return codes.permute(0, 2, 1).to(torch.int64)


def _marginal_log_probs(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """log q(v) for counts [C] with `beta` pseudo-counts per entry (beta = inf: uniform)."""
    num_entries = counts.numel()
    if math.isinf(beta):
        return torch.full((num_entries,), -math.log(num_entries), dtype=torch.float64)
    counts = counts.to(torch.float64) + beta
    return counts.log() - counts.sum().log()


def _conditional_log_probs(
    pair_counts: torch.Tensor, marginal_log_probs: torch.Tensor, alpha: float, given: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """log q(target | given) = log (n(given, target) + alpha q(target)) / (n(given) + alpha), per sample.

    pair_counts float64 [C, C] (rows: the given code), marginal_log_probs [C], given/target int64 [M]."""
    if math.isinf(alpha):
        return marginal_log_probs[target]
    joint = pair_counts[given, target]
    row = pair_counts.sum(1)[given]
    return torch.log(joint + alpha * marginal_log_probs[target].exp()) - torch.log(row + alpha)


def _pair_counts(samples: torch.Tensor, i: int, j: int, num_entries: int) -> torch.Tensor:
    keys = samples[:, i] * num_entries + samples[:, j]
    return torch.bincount(keys, minlength=num_entries * num_entries).view(num_entries, num_entries).to(torch.float64)


def _choose_smoothing(fit: torch.Tensor, check: torch.Tensor, num_entries: int) -> tuple[list[float], torch.Tensor]:
    """Pseudo-counts that maximise the log-likelihood of the `check` samples [M, K] under models fitted on the `fit`
    samples [N, K]: one per marginal ([K] floats), one per ordered pair ([K, K] float64, inf on the diagonal)."""
    num_codebooks = fit.shape[1]
    betas = []
    for k in range(num_codebooks):
        counts = torch.bincount(fit[:, k], minlength=num_entries)
        scores = [float(_marginal_log_probs(counts, beta)[check[:, k]].sum()) for beta in SMOOTHING_GRID]
        betas.append(SMOOTHING_GRID[max(range(len(scores)), key=scores.__getitem__)])
    alphas = torch.full((num_codebooks, num_codebooks), math.inf, dtype=torch.float64)
    for j in range(num_codebooks):
        marginal = _marginal_log_probs(torch.bincount(fit[:, j], minlength=num_entries), betas[j])
        for i in range(num_codebooks):
            if i == j:
                continue
            counts = _pair_counts(fit, i, j, num_entries)
            scores = [
                float(_conditional_log_probs(counts, marginal, alpha, check[:, i], check[:, j]).sum())
                for alpha in SMOOTHING_GRID
            ]
            alphas[i, j] = SMOOTHING_GRID[max(range(len(scores)), key=scores.__getitem__)]
    return betas, alphas


def _percentile_interval(values: torch.Tensor, confidence: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap interval over dim 0 of values [R, ...]."""
    tail = (1 - confidence) / 2
    quantiles = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    low, high = torch.quantile(values, quantiles, dim=0)
    return low, high


def heldout_mutual_information(
    train_codes: torch.Tensor,
    test_codes: torch.Tensor,
    *,
    num_entries: int | None = None,
    delay: bool = False,
    confidence: float = 0.95,
    generator: torch.Generator | None = None,
) -> HeldoutMutualInformation:
    """Pairwise mutual information between codebooks as a held-out cross-entropy difference, with a bootstrap interval.

    For every ordered pair (i, j): I(c_i; c_j) ~ E_test[log q(c_j | c_i) - log q(c_j)], with q fitted on the training
    codes: q(c_j) additively smoothed, q(c_j | c_i) = (n(c_i, c_j) + alpha q(c_j)) / (n(c_i) + alpha). The pseudo-counts
    are chosen on a split of the training codes (a share of its rows, or of its frames when it has one row), never on
    the test codes, then the models are refitted on all training codes. A cross-entropy estimate is consistent where
    count estimates are not (McAllester & Stratos 2020): as the training set grows q approaches p and the estimate
    the MI, while for independent codes the chosen alpha grows (up to inf, q(c_j | c_i) = q(c_j)) and the estimate
    stays near 0 instead of carrying the counts' positive bias (C - 1)^2 / (2N). With little training data it
    underestimates (an unseen dependence cannot be scored). The interval is a percentile bootstrap over the test rows
    (pieces): rows are resampled with replacement and each resample's estimate is its total log-ratio over its
    total frame count.

    Args:
        train_codes: integer [B, K, T] codes the models are fitted on.
        test_codes: integer [B', K, T'] held-out codes (any T'; B' rows are the bootstrap's units).
        num_entries: codebook size C; None takes the largest code of either set + 1.
        delay: delay-align both sets first (`delay_align_codes`; needs T > K and T' > K).
        confidence: of the bootstrap interval, in (0, 1).
        generator: draws the smoothing split and the bootstrap resamples (None: the global RNG).
    Returns:
        HeldoutMutualInformation (.estimate, .low, .high: float64 [K, K], nats; see the class).
    Example:
        >>> mi = heldout_mutual_information(train, test, num_entries=256, delay=True,
        ...                                 generator=torch.Generator().manual_seed(0))
        >>> mi.estimate[0, 1], mi.low[0, 1], mi.high[0, 1]
    """
    for name, codes in (("train_codes", train_codes), ("test_codes", test_codes)):
        try:
            _check_codes_tensor(codes)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{name}: {error}") from None
    if train_codes.shape[1] != test_codes.shape[1]:
        raise ValueError(
            f"train_codes and test_codes must have the same K, got {tuple(train_codes.shape)} and "
            f"{tuple(test_codes.shape)}"
        )
    if not isinstance(confidence, float) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}")
    train = _rows_samples(train_codes, delay)
    test = _rows_samples(test_codes, delay)
    if train.shape[0] * train.shape[1] < 2 or test.numel() == 0:
        raise ValueError(
            f"need at least 2 training samples and 1 test sample, got shapes {tuple(train_codes.shape)} and "
            f"{tuple(test_codes.shape)}"
        )
    high = max(int(train.max()), int(test.max()))
    if min(int(train.min()), int(test.min())) < 0 or (num_entries is not None and high >= num_entries):
        raise ValueError(f"codes must have values in [0, {num_entries or 'C'}), largest seen {high}")
    num_entries = high + 1 if num_entries is None else num_entries
    num_rows, num_frames, num_codebooks = train.shape

    # the smoothing: fit on most of the training rows, score the rest
    if num_rows >= 2:
        order = torch.randperm(num_rows, generator=generator)
        num_check = max(1, round(SMOOTHING_SPLIT * num_rows))
        check, fit = train[order[:num_check]], train[order[num_check:]]
    else:
        cut = max(1, round((1 - SMOOTHING_SPLIT) * num_frames))
        fit, check = train[:, :cut], train[:, cut:]
    betas, alphas = _choose_smoothing(fit.reshape(-1, num_codebooks), check.reshape(-1, num_codebooks), num_entries)

    # per test row: the summed log-ratios of every ordered pair, and the summed marginal log-losses
    flat_train = train.reshape(-1, num_codebooks)
    flat_test = test.reshape(-1, num_codebooks)
    test_rows, test_frames = test.shape[0], test.shape[1]
    per_row = torch.zeros(test_rows, num_codebooks, num_codebooks, dtype=torch.float64)
    marginals = [
        _marginal_log_probs(torch.bincount(flat_train[:, k], minlength=num_entries), betas[k])
        for k in range(num_codebooks)
    ]
    for j in range(num_codebooks):
        marginal = marginals[j][flat_test[:, j]]
        per_row[:, j, j] = -marginal.view(test_rows, test_frames).sum(1)
        for i in range(num_codebooks):
            if i == j:
                continue
            counts = _pair_counts(flat_train, i, j, num_entries)
            conditional = _conditional_log_probs(
                counts, marginals[j], float(alphas[i, j]), flat_test[:, i], flat_test[:, j]
            )
            per_row[:, i, j] = (conditional - marginal).view(test_rows, test_frames).sum(1)

    off_diagonal = ~torch.eye(num_codebooks, dtype=torch.bool)
    estimate = per_row.sum(0) / (test_rows * test_frames)
    # bootstrap: resample rows with replacement (multinomial counts), every row has test_frames frames
    picks = torch.randint(0, test_rows, (BOOTSTRAP_RESAMPLES, test_rows), generator=generator)
    weights = torch.zeros(BOOTSTRAP_RESAMPLES, test_rows, dtype=torch.float64)
    weights.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float64))
    resampled = torch.einsum("rb,bij->rij", weights, per_row) / (test_rows * test_frames)
    low, high_ = _percentile_interval(resampled, confidence)
    mean = (math.nan, math.nan, math.nan)
    if num_codebooks > 1:
        mean_low, mean_high = _percentile_interval(resampled[:, off_diagonal].mean(1), confidence)
        mean = (float(estimate[off_diagonal].mean()), float(mean_low), float(mean_high))
    return HeldoutMutualInformation(
        estimate=estimate,
        low=low,
        high=high_,
        confidence=confidence,
        conditional_smoothing=alphas,
        marginal_smoothing=torch.tensor(betas, dtype=torch.float64),
        num_train_samples=int(flat_train.shape[0]),
        num_test_samples=int(flat_test.shape[0]),
        num_test_rows=test_rows,
        mean_offdiagonal=mean,
    )
