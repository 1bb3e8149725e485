"""Uncertainty of the numbers this project reports: across seeds, for fractions of molecules, for fractions of
atoms clustered by molecule. One helper, used by metrics.json and by the experiments behind BENCHMARKS.md.

- Across seeds (a few runs of one arm): mean, sample standard deviation and a two-sided confidence interval from
  Student's t with n - 1 degrees of freedom (the runs are few, so the normal quantile would be too narrow).
  Two arms that share seeds are compared by their paired differences (`paired_difference`); where that interval
  holds 0 the arms are "not separable" at that confidence.
- A fraction of molecules (validity, molecule stability): Wilson's score interval, which stays inside [0, 1] and
  keeps its coverage near 0 and 1, where a normal interval does not (Brown, Cai and DasGupta, Statistical
  Science 16(2), 2001).
- A fraction of atoms (atom stability): the atoms of one molecule are not independent (one bad bond makes two
  unstable atoms), so the standard error is the ratio estimator's with molecules as clusters:
  var(p) = n / (n - 1) * sum_i (y_i - p m_i)^2 / (sum_i m_i)^2 for molecule i with m_i atoms of which y_i are
  stable (Cochran, Sampling Techniques, 3rd ed., section 6.4). It needs only sums over molecules
  (`ClusterSums`), so Ray workers can add theirs up like any other count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class SeedSummary:
    """Runs of one arm (or the paired differences of two): n, mean, sample standard deviation (ddof 1), and the
    t interval of the mean at ``confidence``."""
    n: int
    mean: float
    std: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    @property
    def separable_from_zero(self) -> bool:
        """The interval excludes 0 (for paired differences: the arms differ at this confidence)."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "std": self.std, "ci_low": self.low, "ci_high": self.high,
                "confidence": self.confidence, "interval": "Student t, n - 1 degrees of freedom"}

    def text(self, digits: int = 3) -> str:
        """'0.702 +- 0.003 (95% CI 0.695 to 0.709, n = 3)': mean +- standard deviation, then the interval."""
        return (f"{self.mean:.{digits}f} +- {self.std:.{digits}f} ({self.confidence:.0%} CI {self.low:.{digits}f} "
                f"to {self.high:.{digits}f}, n = {self.n})")


def across_seeds(values, confidence: float = CONFIDENCE) -> SeedSummary:
    """Mean, standard deviation and t interval of one value per seed (at least 2 values, all finite)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"across_seeds needs at least 2 values, one per seed (got {x.size})")
    if not np.isfinite(x).all():
        raise ValueError(f"across_seeds: non-finite values {x.tolist()}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1) (got {confidence})")
    mean, std = float(x.mean()), float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=len(x) - 1)) * std / math.sqrt(len(x))
    return SeedSummary(len(x), mean, std, mean - half, mean + half, confidence)


def paired_difference(a, b, confidence: float = CONFIDENCE) -> SeedSummary:
    """across_seeds of a[i] - b[i]: two arms run with the same seeds (the same data order, the same draws)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs one value per seed in each arm (got {a.shape} and {b.shape})")
    return across_seeds(a - b, confidence)


def bootstrap_interval(values, statistic=np.mean, confidence: float = CONFIDENCE, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (resampled with replacement, fixed seed):
    for statistics without a closed-form interval (a median, a ratio)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        raise ValueError("bootstrap_interval needs at least 2 values")
    rng = np.random.default_rng(seed)
    draws = statistic(x[rng.integers(0, len(x), size=(resamples, len(x)))], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval of a fraction of independent trials (molecules); (0, 1) for no trials."""
    if trials == 0:
        return 0.0, 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval: {successes} successes out of {trials} trials")
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class ClusterSums:
    """Sums over molecules of what the clustered standard error of an atom fraction needs: y_i (stable atoms of
    molecule i) and m_i (its atoms). Add molecules with ``add``, merge workers' sums with ``+``."""
    clusters: int = 0
    y: float = 0.0
    m: float = 0.0
    yy: float = 0.0
    ym: float = 0.0
    mm: float = 0.0

    def add(self, y: int, m: int) -> None:
        self.clusters += 1
        self.y += y
        self.m += m
        self.yy += y * y
        self.ym += y * m
        self.mm += m * m

    def __add__(self, other: ClusterSums) -> ClusterSums:
        return ClusterSums(self.clusters + other.clusters, self.y + other.y, self.m + other.m,
                           self.yy + other.yy, self.ym + other.ym, self.mm + other.mm)

    def as_dict(self) -> dict:
        return {"clusters": self.clusters, "y": self.y, "m": self.m, "yy": self.yy, "ym": self.ym, "mm": self.mm}


def clustered_fraction(sums: ClusterSums) -> tuple[float, float | None]:
    """(sum y / sum m, its standard error with molecules as clusters); the error is None for fewer than 2
    molecules."""
    if sums.m == 0:
        return 0.0, None
    p = sums.y / sums.m
    if sums.clusters < 2:
        return p, None
    # sum_i (y_i - p m_i)^2 from the sums alone; rounding can take a zero spread a hair below 0
    spread = max(0.0, sums.yy - 2 * p * sums.ym + p * p * sums.mm)
    n = sums.clusters
    return p, math.sqrt(n / (n - 1) * spread) / sums.m
