"""The bench's statistics, pure: quantiles, a run's :class:`Summary`, and ratios.

The centre is the median; the spread is the interquartile range (first to third
quartile, linear interpolation between order statistics, as numpy's default),
with min and max also recorded. Ratios are ratios of medians, or, paired, the
median of per-repeat ratios (robust to drift). :func:`mixture_speed` is the
speed of an ideal ``me`` ensemble, from its members' ``single`` speeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) by linear interpolation between order statistics
    (Hyndman and Fan type 7, numpy's default)."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return quantile(values, 0.5)


def percentile(values: Sequence[float], p: float) -> float:
    return quantile(values, p / 100.0)


@dataclass(frozen=True)
class Summary:
    """Median and spread of repeated measurements."""

    n: int
    median: float
    q1: float
    q3: float
    min: float
    max: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        xs = [float(v) for v in values]
        if not xs:
            raise ValueError("summary of no values")
        return cls(len(xs), median(xs), quantile(xs, 0.25), quantile(xs, 0.75), min(xs), max(xs))

    def to_dict(self, digits: int = 4) -> dict[str, Any]:
        d: dict[str, Any] = {k: round(v, digits) for k, v in asdict(self).items() if k != "n"}
        d["n"] = self.n
        d["iqr"] = round(self.iqr, digits)
        return d


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def bytes_per_second(total_bytes: int, first_bytes: int, span_s: float) -> float:
    """Text speed after the first token, as tokens/s is measured: the bytes that came after
    the first token's over the ``span_s`` seconds from the first token to the last (0 when
    no time passed). Across vocabularies tokens are not comparable; bytes are."""
    return (total_bytes - first_bytes) / span_s if span_s > 0 else 0.0


def paired_ratio(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> float | None:
    """The median of per-repeat ratios (pairs with a missing side are skipped)."""
    rs = [r for r in (ratio(a, b) for a, b in zip(numerators, denominators)) if r is not None]
    return median(rs) if rs else None


def mixture_speed(speeds: Sequence[float], weights: Sequence[float]) -> float | None:
    """The tokens/s of an ideal ``me`` that paid nothing for catch-up: each token costs the
    drawn member's single-step time, so the expected time per token is Σ λ_i / s_i
    (a weighted harmonic mean of the members' ``single`` speeds)."""
    total = sum(w for w in weights if w > 0)
    if total <= 0:
        return None
    t = 0.0
    for s, w in zip(speeds, weights):
        if w <= 0:
            continue
        if s <= 0:
            return None
        t += (w / total) / s
    return 1.0 / t

