"""evals/protocol/statistics.py: intervals that hold their stated coverage, and the clustered standard error."""

import math

import numpy as np
import pytest

from molscale.evals.protocol.statistics import (
    ClusterSums,
    across_seeds,
    bootstrap_interval,
    clustered_fraction,
    paired_difference,
    wilson_interval,
)


def test_across_seeds_uses_students_t():
    summary = across_seeds([1.0, 2.0, 3.0])
    assert summary.n == 3 and summary.mean == 2.0 and summary.std == 1.0
    # t(0.975, 2 degrees of freedom) = 4.303 (tables); a normal quantile (1.96) would give a half-width of 1.13
    assert summary.high - summary.mean == pytest.approx(4.303 / math.sqrt(3), rel=1e-3)
    assert summary.low == pytest.approx(2 * summary.mean - summary.high)
    assert "95% CI" in summary.text() and summary.as_dict()["ci_high"] == summary.high


def test_seed_intervals_cover_the_true_mean_as_stated():
    rng = np.random.default_rng(0)
    covered = sum(s.low <= 5.0 <= s.high for s in (across_seeds(rng.normal(5.0, 2.0, 3)) for _ in range(4000)))
    assert 0.93 <= covered / 4000 <= 0.97  # a normal-quantile interval covers about 0.88 with 3 seeds


def test_paired_difference_says_when_arms_separate():
    assert paired_difference([2.0, 2.1, 1.9, 2.05], [1.0, 1.1, 0.95, 1.0]).separable_from_zero
    assert not paired_difference([1.0, 1.3, 0.8], [1.1, 1.0, 1.0]).separable_from_zero
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least 2 values"):
        across_seeds([1.0])
    with pytest.raises(ValueError, match="non-finite"):
        across_seeds([1.0, float("nan")])
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_wilson_interval_known_values_and_bounds():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # 0 of 10 (Brown, Cai and DasGupta 2001)
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(1 - 0.2775, abs=1e-4)
    low, high = wilson_interval(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bootstrap_interval_is_reproducible_and_brackets_the_statistic():
    values = np.random.default_rng(1).normal(3.0, 1.0, 40)
    first, second = bootstrap_interval(values, np.median), bootstrap_interval(values, np.median)
    assert first == second and first[0] < np.median(values) < first[1]


def test_clustered_error_matches_the_per_molecule_formula_and_merges_across_workers():
    rng = np.random.default_rng(2)
    atoms = rng.integers(3, 27, 200)
    stable = np.minimum(atoms, rng.binomial(atoms, 0.9) + rng.integers(0, 2, 200))
    left, right = ClusterSums(), ClusterSums()
    for k, (y, m) in enumerate(zip(stable, atoms)):
        (left if k % 2 else right).add(int(y), int(m))
    p, se = clustered_fraction(left + right)
    expected_p = stable.sum() / atoms.sum()
    n = len(atoms)
    expected_se = math.sqrt(n / (n - 1) * ((stable - expected_p * atoms) ** 2).sum()) / atoms.sum()
    assert p == pytest.approx(expected_p) and se == pytest.approx(expected_se, rel=1e-9)


def test_clustered_error_is_wider_than_the_atom_level_one_when_atoms_of_a_molecule_go_together():
    rng = np.random.default_rng(3)
    sums = ClusterSums()
    for _ in range(300):  # each molecule entirely stable or entirely not: atoms are not independent draws
        m = int(rng.integers(5, 20))
        sums.add(m if rng.random() < 0.6 else 0, m)
    p, se = clustered_fraction(sums)
    atom_level = math.sqrt(p * (1 - p) / sums.m)
    assert se > 2.5 * atom_level
    assert clustered_fraction(ClusterSums()) == (0.0, None)
