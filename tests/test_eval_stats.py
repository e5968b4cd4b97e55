"""The statistics of ``me-local eval --task``: Wilson's interval against published values,
McNemar's exact test against the binomial computed by hand, and the paired bootstrap against
resampling the pairs directly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from me_local.evaluation.stats import Z95, mcnemar_exact, paired_difference, wilson

# Newcombe, R. G. (1998), "Two-sided confidence intervals for the single proportion: comparison
# of seven methods", Statistics in Medicine 17, 857-872, Table II, method 3 (Wilson's score
# interval without continuity correction), to 4 decimals.
NEWCOMBE = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
]


@pytest.mark.parametrize(("k", "n", "low", "high"), NEWCOMBE)
def test_wilson_interval_matches_newcombes_published_values(k, n, low, high):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_wilson_bounds_are_where_the_score_test_is_exactly_z():
    for k, n in [(3, 10), (50, 60), (10, 10), (0, 7)]:
        for p in wilson(k, n):
            if 0 < p < 1:
                assert abs(k / n - p) / math.sqrt(p * (1 - p) / n) == pytest.approx(Z95)
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 7)[0] == 0.0
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_wilson_covers_the_true_proportion_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    p, n = 0.3, 80
    ks = rng.binomial(n, p, size=4000)
    cover = np.mean([lo <= p <= hi for lo, hi in (wilson(int(k), n) for k in ks)])
    assert 0.93 < cover < 0.97


def test_mcnemar_exact_is_twice_the_binomial_tail_of_the_discordant_pairs():
    # b=1, c=7: 8 discordant questions; P(X <= 1) for X ~ Bin(8, 1/2) is (1 + 8) / 256
    assert mcnemar_exact(1, 7) == pytest.approx(2 * 9 / 256)
    assert mcnemar_exact(7, 1) == mcnemar_exact(1, 7)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(4, 4) == 1.0 and mcnemar_exact(0, 0) == 1.0
    # large counts stay finite and tiny
    assert 0 < mcnemar_exact(100, 300) < 1e-20


def test_paired_difference_counts_and_its_bootstrap_matches_resampling_the_pairs():
    rng = np.random.default_rng(7)
    n = 400
    a = rng.random(n) < 0.62
    b = np.where(rng.random(n) < 0.8, a, ~a)  # correlated with a, as two systems on the same questions are
    d = paired_difference(a, b)
    assert d.a_only == int((a & ~b).sum()) and d.b_only == int((~a & b).sum())
    assert d.value == pytest.approx(a.mean() - b.mean())
    assert d.p_value == mcnemar_exact(d.a_only, d.b_only)
    assert d.low < d.value < d.high
    # the same interval as resampling whole questions (both systems' results together)
    idx = np.random.default_rng(3).integers(0, n, size=(4000, n))
    direct = (a[idx].mean(axis=1) - b[idx].mean(axis=1))
    lo, hi = np.quantile(direct, [0.025, 0.975])
    assert d.low == pytest.approx(lo, abs=0.008) and d.high == pytest.approx(hi, abs=0.008)
    # fixed seed: the same interval every time; 10,000 resamples make it stable across seeds
    assert paired_difference(a, b) == d
    other = paired_difference(a, b, seed=1)
    assert abs(other.low - d.low) <= 0.006 and abs(other.high - d.high) <= 0.006


def test_a_difference_that_is_noise_has_an_interval_around_zero_and_a_real_one_does_not():
    rng = np.random.default_rng(0)
    n = 300
    truth = rng.random(n) < 0.5
    same = np.where(rng.random(n) < 0.9, truth, ~truth)
    noise = paired_difference(same, np.where(rng.random(n) < 0.9, truth, ~truth))
    assert noise.low < 0 < noise.high and noise.p_value > 0.05
    better = paired_difference(truth | (rng.random(n) < 0.3), truth)
    assert better.low > 0 and better.p_value < 0.001
