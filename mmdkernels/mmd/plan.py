"""The bandwidth chain: exp(-coef_j d) for all bandwidths from one exp per distance entry.

With the default bandwidths (0.1, 1, 5, 10, 20, 50) the coefficients 1/(2a) are 5, 0.5, 0.1, 0.05, 0.025, 0.01:
all integer multiples (1000, 100, 20, 10, 5, 2) of base 0.005. The kernels evaluate v = exp(-0.005 d) once and
reach each bandwidth as a small integer power of an earlier one (v^2, v^5, (v^5)^2, (v^10)^2, (v^20)^5,
(v^100)^10). Powers amplify the relative error of v by at most the power (1000 x 6e-8 = 6e-5 at d ~ 0), below
the float32 cancellation error of the distance itself (~1e-4 at K*D = 512). Bandwidths without such a base are
each evaluated by their own exp. The struct this fills is `BandwidthPlan` in csrc/mmd/mmd_tile.h.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from mmdkernels._ext import constant_under_compile

MAX_BANDWIDTHS = 8  # kMaxBandwidths in csrc/mmd/mmd_tile.h
MAX_CHAIN_POWER = 1024  # kMaxChainPower: the largest chain_step every backend accepts
DIRECT_EXP = -2  # kDirectExp
FROM_BASE = -1  # kFromBase


@dataclass(frozen=True)
class BandwidthPlan:
    """coefs sorted ascending; e_j = exp(-coefs[j] d) is e_{src[j]} ** step[j] (src -1: the base, -2: own exp)."""

    coefs: tuple[float, ...]
    src: tuple[int, ...]
    step: tuple[int, ...]
    base_coef: float

    def as_op_args(self) -> tuple[list[float], list[int], list[int], float]:
        return list(self.coefs), list(self.src), list(self.step), self.base_coef


def _common_base(coefs: Sequence[float]) -> tuple[Fraction, list[int]] | None:
    fractions = [Fraction(c).limit_denominator(10**6) for c in coefs]
    if any(abs(float(f) - c) > 1e-9 * c for f, c in zip(fractions, coefs)):
        return None
    numerator_gcd = 0
    denominator_lcm = 1
    for f in fractions:
        numerator_gcd = _gcd(numerator_gcd, f.numerator)
        denominator_lcm = denominator_lcm * f.denominator // _gcd(denominator_lcm, f.denominator)
    base = Fraction(numerator_gcd, denominator_lcm)
    powers = [int(f / base) for f in fractions]
    if max(powers) > MAX_CHAIN_POWER:
        return None
    return base, powers


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def build_plan(bandwidths: Sequence[float], chain: bool = True) -> BandwidthPlan:
    """Plan for the given bandwidths (order does not matter: the loss sums over them).

    Args:
        bandwidths: positive floats, at most 8.
        chain: derive bandwidths from one exp when their coefficients share a base (else one exp each).
    """
    coefs = sorted(0.5 / float(a) for a in bandwidths)
    common = _common_base(coefs) if chain else None
    if common is None:
        n = len(coefs)
        return BandwidthPlan(tuple(coefs), (DIRECT_EXP,) * n, (1,) * n, 0.0)
    base, powers = common
    src, step = [], []
    for j, power in enumerate(powers):
        divisors = [i for i in range(j) if power % powers[i] == 0]
        if divisors:
            # the largest earlier divisor gives the smallest step, so the fewest multiplies
            i = max(divisors, key=lambda i: powers[i])
            src.append(i)
            step.append(power // powers[i])
        else:
            src.append(FROM_BASE)
            step.append(power)
    return BandwidthPlan(tuple(coefs), tuple(src), tuple(step), float(base))


@constant_under_compile
def plan_op_args(bandwidths: tuple[float, ...]) -> tuple[list[float], list[int], list[int], float]:
    """build_plan(bandwidths).as_op_args(), which torch.compile takes as a constant (the plan's rational arithmetic
    is not traceable)."""
    return build_plan(bandwidths).as_op_args()
