"""The main job's interval estimates: paired differences over seeds (Student t) and a bootstrap over pieces.

paired_difference(a, b): the per-seed differences d_s = b_s - a_s of two paired runs (same seed, same data), their
mean and the t interval mean +- t_{n-1} sd / sqrt(n); `excludes_zero` says whether the interval lies on one side of
0. bootstrap_ratio(numerators, denominators): sum(num) / sum(den) over units (pieces) resampled with replacement,
with a percentile interval.
"""

from __future__ import annotations

import math

import torch

BOOTSTRAP_RESAMPLES = 2000


def _t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with df degrees of freedom (Simpson's rule on the density from 0 to |x|)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    steps = 4000
    width = abs(x) / steps
    total = 0.0
    for i in range(steps + 1):
        t = i * width
        weight = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += weight * math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))
    half = total * width / 3
    return 0.5 + half if x >= 0 else 0.5 - half


def t_quantile(probability: float, df: int) -> float:
    """The Student-t quantile (bisection on `_t_cdf`), e.g. t_quantile(0.975, 4) = 2.776."""
    if not 0.5 <= probability < 1 or df < 1:
        raise ValueError(f"need probability in [0.5, 1) and df >= 1, got {probability}, {df}")
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < probability:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_cdf(middle, df) < probability else (low, middle)
    return (low + high) / 2


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95) -> dict:
    """Mean paired difference b - a over seeds with its t interval (None bounds for a single seed).

    Returns:
        {"differences": [d_s], "mean", "low", "high": floats (low/high None when n < 2), "n",
         "excludes_zero": bool (False when there is no interval)}
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need equally many paired values, got {len(a)} and {len(b)}")
    differences = [y - x for x, y in zip(a, b)]
    n = len(differences)
    mean = math.fsum(differences) / n
    low = high = None
    if n >= 2:
        sd = math.sqrt(math.fsum((d - mean) ** 2 for d in differences) / (n - 1))
        half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    excludes = low is not None and (low > 0 or high < 0)
    return {"differences": differences, "mean": mean, "low": low, "high": high, "n": n, "excludes_zero": excludes}


def bootstrap_ratio(
    numerators: torch.Tensor, denominators: torch.Tensor, generator: torch.Generator, confidence: float = 0.95
) -> tuple[float, float, float]:
    """(estimate, low, high) of sum(numerators) / sum(denominators), resampling the units (e.g. pieces) [P]."""
    numerators, denominators = numerators.double(), denominators.double()
    units = numerators.numel()
    picks = torch.randint(0, units, (BOOTSTRAP_RESAMPLES, units), generator=generator)
    ratios = numerators[picks].sum(1) / denominators[picks].sum(1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(ratios, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(numerators.sum() / denominators.sum()), low, high
