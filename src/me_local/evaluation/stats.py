"""Statistics for accuracies: a 95% interval for one accuracy (Wilson's score interval) and
for the paired difference of two systems on the same questions (a paired bootstrap with a
fixed seed, and McNemar's exact test). Pure Python and numpy; docs/eval.md explains them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Z95 = 1.959963984540054
"""The standard normal's 97.5% quantile: a two-sided 95% interval."""

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion of ``k`` successes in ``n`` trials (95% by
    default): the proportions p whose score test |k/n - p| / sqrt(p(1-p)/n) <= z. Unlike the
    normal approximation it stays inside [0, 1] and is sensible at 0 and n successes."""
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes in {n} trials")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exactly 0 (1), not a rounding away from it
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact test (two-sided) of two systems scored on the same questions:
    ``b`` questions only the first got right, ``c`` only the second. Under the null
    hypothesis that both are equally accurate, each of the b + c discordant questions goes
    either way with probability 1/2: p = min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2)."""
    if b < 0 or c < 0:
        raise ValueError("counts must be >= 0")
    n = b + c
    if n == 0:
        return 1.0
    lo = min(b, c)
    log_half_n = n * math.log(0.5)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n for i in range(lo + 1)]
    m = max(terms)
    tail = math.exp(m) * sum(math.exp(t - m) for t in terms)
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of system A minus that of system B on the same questions."""

    value: float
    low: float
    high: float
    """The paired bootstrap's 95% percentile interval."""
    a_only: int
    """Questions A got right and B wrong."""
    b_only: int
    """Questions B got right and A wrong."""
    p_value: float
    """McNemar's exact test of equal accuracy."""
    resamples: int
    seed: int


def paired_difference(a: npt.ArrayLike, b: npt.ArrayLike, *, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> PairedDifference:
    """The difference in accuracy of A and B (per-question correctness, same questions in the
    same order), with a paired bootstrap interval: the questions are resampled with
    replacement, each keeping both systems' results, ``resamples`` times from a generator
    seeded with ``seed``. A question adds +1, 0 or -1 to the difference, so a resample is a
    multinomial draw of those three counts (the same distribution as resampling the pairs,
    without an n x resamples array)."""
    x = np.asarray(a, dtype=bool)
    y = np.asarray(b, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("two equal-length vectors of per-question results")
    n = int(x.shape[0])
    a_only = int((x & ~y).sum())
    b_only = int((~x & y).sum())
    p_value = mcnemar_exact(a_only, b_only)
    if n == 0:
        nan = float("nan")
        return PairedDifference(nan, nan, nan, 0, 0, 1.0, resamples, seed)
    value = (a_only - b_only) / n
    rng = np.random.default_rng(seed)
    probs = np.array([a_only, b_only, n - a_only - b_only], dtype=np.float64) / n
    draws = rng.multinomial(n, probs, size=resamples)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    tail = (1.0 - level) / 2
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    return PairedDifference(value, float(low), float(high), a_only, b_only, p_value, resamples, seed)
