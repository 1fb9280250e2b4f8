"""Intervals, bootstraps and permutation tests: the one place for lens_safety's statistics.

Everything is computed in float64. Where scipy has the method it is used (Student-t quantiles,
``scipy.stats.bootstrap`` with BCa, the normal quantile); the closed forms kept here (Wilson,
Hanley-McNeil) are vectorised textbook formulas.

>>> lo, hi = wilson_interval(50, 100)
>>> round(float(lo), 3), round(float(hi), 3)
(0.404, 0.596)
>>> [round(v, 3) for v in mean_ci([1.0, 2.0, 3.0])]
[2.0, -0.484, 4.484]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from .errors import InputError

__all__ = ["z_value", "wilson_interval", "auroc_interval", "mean_ci", "bootstrap_ci", "bootstrap_rows",
           "permutation_pvalue", "nanmean", "bootstrap_ratio_ci"]


def z_value(level: float = 0.95) -> float:
    """Two-sided normal quantile for a confidence ``level`` (1.96 at 0.95)."""
    from scipy import stats

    _check_level(level)
    return float(stats.norm.ppf(0.5 + level / 2))


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise InputError(f"level must be in (0, 1), got {level!r} (0.95 for a 95% interval).")


def wilson_interval(k: np.ndarray | int, n: np.ndarray | int, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion ``k / n`` (inside [0, 1], sane at 0 and 1; vectorised).

    >>> [round(float(v), 3) for v in wilson_interval(0, 10)]
    [0.0, 0.278]
    """
    z = z_value(level)
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def auroc_interval(auc: float, n_pos: int, n_neg: int, level: float = 0.95) -> tuple[float, float]:
    """Normal interval of an AUROC with the Hanley & McNeil (1982) standard error.

    >>> [round(v, 3) for v in auroc_interval(0.8, 50, 50)]
    [0.713, 0.887]
    """
    a = float(auc)
    if not math.isfinite(a) or n_pos < 1 or n_neg < 1:
        return math.nan, math.nan
    z = z_value(level)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return max(0.0, a - z * se), min(1.0, a + z * se)


def mean_ci(x: np.ndarray | Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval, NaNs dropped. One value: the interval is the value itself.

    >>> mean_ci([2.0])
    (2.0, 2.0, 2.0)
    """
    from scipy import stats

    _check_level(level)
    a = np.asarray(x, dtype=np.float64).ravel()
    a = a[~np.isnan(a)]
    if a.size == 0:
        return math.nan, math.nan, math.nan
    m = float(a.mean())
    if a.size == 1 or float(a.std()) == 0.0:
        return m, m, m
    half = float(stats.t.ppf(0.5 + level / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return m, m - half, m + half


def bootstrap_ci(x: np.ndarray | Sequence[float], statistic: Callable[..., float] = np.mean, *,
                 level: float = 0.95, n_resamples: int = 2000, method: str = "BCa",
                 seed: int = 0) -> tuple[float, float, float]:
    """``(statistic(x), low, high)`` with ``scipy.stats.bootstrap`` (BCa by default), NaNs dropped.

    Degenerate samples (one value, or all equal) give the point itself as the interval; when BCa
    cannot be computed (scipy returns NaN) the percentile interval is used instead.

    >>> est, lo, hi = bootstrap_ci([0.1, 0.4, 0.35, 0.8, 0.5, 0.45, 0.6, 0.2])
    >>> lo < est < hi
    True
    """
    from scipy import stats

    _check_level(level)
    a = np.asarray(x, dtype=np.float64).ravel()
    a = a[~np.isnan(a)]
    if a.size == 0:
        return math.nan, math.nan, math.nan
    est = float(statistic(a))
    if a.size < 2 or np.ptp(a) == 0:
        return est, est, est
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on degenerate BCa; handled below
        res = stats.bootstrap((a,), lambda s, axis=-1: statistic(s, axis=axis), confidence_level=level,
                              n_resamples=n_resamples, method=method, random_state=np.random.default_rng(seed),
                              vectorized=True)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isfinite(lo) and math.isfinite(hi)) and method.lower() != "percentile":
            res = stats.bootstrap((a,), lambda s, axis=-1: statistic(s, axis=axis), confidence_level=level,
                                  n_resamples=n_resamples, method="percentile",
                                  random_state=np.random.default_rng(seed), vectorized=True)
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return est, lo, hi


def bootstrap_rows(m: np.ndarray, n_resamples: int, seed: int = 0) -> np.ndarray:
    """Row indices resampled with replacement: ``[n_resamples, n_rows]`` (seeded).

    For statistics that are not a function scipy can vectorise (a threshold crossing of a
    mean curve): ``m[bootstrap_rows(m, 1000)]`` gives 1000 resampled row sets.
    """
    rng = np.random.default_rng(seed)
    n = np.asarray(m).shape[0]
    return rng.integers(0, n, size=(n_resamples, n))


def permutation_pvalue(observed: float, null: np.ndarray | Sequence[float], *, greater: bool = True) -> float:
    """One-sided permutation p-value with the +1 correction: ``(1 + #{null >= obs}) / (1 + n)``.

    >>> permutation_pvalue(0.9, [0.5, 0.55, 0.6, 0.52])
    0.2
    """
    null = np.asarray(null, dtype=np.float64)
    null = null[~np.isnan(null)]
    hits = np.sum(null >= observed) if greater else np.sum(null <= observed)
    return float((1 + hits) / (1 + null.size))


def nanmean(m: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``np.nanmean`` without the all-NaN warning (an all-NaN slice is NaN, as it should be)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(m, axis=axis)


def bootstrap_ratio_ci(num: np.ndarray | Sequence[float], den: np.ndarray | Sequence[float], *,
                       level: float = 0.95, n_resamples: int = 2000, method: str = "BCa",
                       seed: int = 0) -> tuple[float, float, float]:
    """``(mean(num) / mean(den), low, high)``: a ratio of means with a paired ``scipy.stats.bootstrap``
    (rows of ``num`` and ``den`` resampled together; BCa by default, percentile when BCa fails).
    Rows where either is NaN are dropped. Used for TransformerLens-style patching recovery.

    >>> est, lo, hi = bootstrap_ratio_ci([1.0, 2.0, 1.5, 0.5, 1.2], [2.0, 3.0, 2.5, 2.0, 2.2])
    >>> round(est, 3), lo < est < hi
    (0.53, True)
    """
    from scipy import stats

    _check_level(level)
    a, b = np.asarray(num, dtype=np.float64).ravel(), np.asarray(den, dtype=np.float64).ravel()
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if a.size == 0 or b.mean() == 0:
        return math.nan, math.nan, math.nan
    est = float(a.mean() / b.mean())
    if a.size < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return est, est, est

    def ratio(x, y, axis=-1):
        return x.mean(axis=axis) / y.mean(axis=axis)

    lo = hi = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate BCa: handled below
        for m in dict.fromkeys([method, "percentile"]):
            res = stats.bootstrap((a, b), ratio, paired=True, vectorized=True, confidence_level=level,
                                  n_resamples=n_resamples, method=m, random_state=np.random.default_rng(seed))
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
            if math.isfinite(lo) and math.isfinite(hi):
                break
    return est, lo, hi
