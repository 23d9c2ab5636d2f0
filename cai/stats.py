"""Small, seeded statistics shared by label-quality metrics, reward models and evaluation.

Each tool is deterministic for a given ``seed``:

- :func:`rate_ci` -- the interval of a rate (agreement, accuracy, harmless rate, a win rate with
  ties counted half): Wilson's score interval when every unit is 0 or 1, else the BCa bootstrap
  (falling back to Wilson on the sum when every unit is equal, where BCa is undefined). Both
  cover their nominal 95% at the small samples cai's quickstart evaluates (n = 32, true rate 0.5
  or 0.9; ``tests/test_stats_coverage.py`` simulates it), which the percentile bootstrap does not
  (83% at n = 32, rate 0.9).
- :func:`bootstrap_ci` -- the bias-corrected and accelerated (BCa, Efron 1987) bootstrap interval
  of a statistic over independent units, through :func:`scipy.stats.bootstrap`; ``method=
  "percentile"`` for statistics too costly to jackknife (a refitted model per resample).
- :func:`wilson_ci` -- Wilson's score interval of ``successes`` out of ``n``.
- :func:`paired_bootstrap_diff` -- the difference of one statistic between two arms measured on
  the *same* units: the units are resampled jointly, so the correlation between the arms is kept
  and the interval is narrower than two independent intervals would suggest.
- :func:`paired_permutation_test` -- a sign-flip test of "the two arms have the same mean" on
  paired values: under the null each unit's difference is as likely to have either sign. With
  few units every sign pattern is enumerated (an exact p-value); otherwise ``n`` random patterns
  are drawn and the p-value is ``(1 + hits) / (1 + n)``, which never reports an impossible 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cai.errors import DataError

Stat = Callable[..., float]
_CHUNK_CELLS = 2_000_000  # resampled values held in memory at once (~16 MB of float64)


@dataclass(frozen=True)
class PairedDiff:
    """``stat(a) - stat(b)`` over paired units, with its bootstrap interval."""

    diff: float
    ci_low: float
    ci_high: float
    n: int


@dataclass(frozen=True)
class PairedTest:
    """A paired sign-flip test of ``mean(a - b) == 0``."""

    mean_diff: float
    p_value: float
    n: int  # units whose difference entered the test
    resamples: int  # sign patterns evaluated (2**n when exact)
    exact: bool
    alternative: str  # "two-sided" | "greater" (a > b) | "less" (a < b)


def _as_array(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D sequence of numbers, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what}: no values (a confidence interval needs at least one unit)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: values must be finite numbers")
    return arr


def _check_common(n: int, alpha: float) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (bootstrap resamples) must be an int >= 1, got {n!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def _stat_rows(stat: Stat, samples: np.ndarray) -> np.ndarray:
    """``stat`` of each row of ``samples``: vectorised when ``stat`` takes ``axis``."""
    try:
        out = np.asarray(stat(samples, axis=1), dtype=float)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:
        pass
    return np.array([float(stat(row)) for row in samples])


def _resampled_stats(arrays: Sequence[np.ndarray], stat: Stat, n: int, seed: int) -> list[np.ndarray]:
    """``stat`` of each array under the same ``n`` index resamples (chunked to bound memory)."""
    m = arrays[0].size
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_CELLS // m)
    outs: list[list[np.ndarray]] = [[] for _ in arrays]
    done = 0
    while done < n:
        k = min(rows, n - done)
        idx = rng.integers(0, m, size=(k, m))
        for out, arr in zip(outs, arrays):
            out.append(_stat_rows(stat, arr[idx]))
        done += k
    return [np.concatenate(o) for o in outs]


def _interval(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Stat = np.mean,
    n: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    method: str = "bca",
) -> tuple[float, float]:
    """``(low, high)``: the ``1 - alpha`` bootstrap interval of ``stat(values)``.

    ``values`` are one number per independent unit. ``method="bca"`` (default): bias-corrected
    and accelerated, via :func:`scipy.stats.bootstrap` (all resamples at once when ``stat``
    accepts ``axis``, as numpy reductions do); when every resample gives the same value (all
    units equal) the interval is that value. ``method="percentile"``: the ``alpha/2`` and
    ``1 - alpha/2`` quantiles of the resampled statistic (``stat`` may be any function of the resampled array). Raises
    ``ValueError`` on empty or non-finite input.
    """
    _check_common(n, alpha)
    arr = _as_array(values, "bootstrap_ci values")
    if method == "percentile":
        (stats,) = _resampled_stats([arr], stat, n, seed)
        return _interval(stats, alpha)
    if method != "bca":
        raise ValueError(f"bootstrap_ci: method must be 'bca' or 'percentile', got {method!r}")
    if arr.size < 2 or np.all(arr == arr[0]):
        value = float(stat(arr))
        return value, value  # every resample is the same sample: no spread to estimate
    from scipy.stats import bootstrap

    # vectorized=None: scipy calls ``stat`` on all resamples at once when it takes ``axis``
    res = bootstrap((arr,), stat, n_resamples=n, confidence_level=1.0 - alpha, method="BCa",
                    vectorized=None, rng=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):  # a degenerate jackknife: percentile instead
        (stats,) = _resampled_stats([arr], stat, n, seed)
        return _interval(stats, alpha)
    return low, high


def wilson_ci(successes: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson's score interval for a rate of ``successes`` out of ``n`` (``successes`` may be a
    sum of fractional scores in [0, 1]); ``(nan, nan)`` when ``n`` is 0."""
    if n <= 0:
        return math.nan, math.nan
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    from scipy.stats import norm

    z = float(norm.ppf(1.0 - alpha / 2.0))
    p = float(successes) / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(max(p * (1.0 - p), 0.0) / n + z * z / (4.0 * n * n)) / denom
    # at p = 0 (p = 1) the lower (upper) bound is exactly 0 (1); say so, not 1 - 1e-16
    low = 0.0 if p <= 0.0 else max(0.0, centre - half)
    high = 1.0 if p >= 1.0 else min(1.0, centre + half)
    return low, high


def rate_ci(values: Sequence[float] | np.ndarray, n: int = 2000, seed: int = 0,
            alpha: float = 0.05) -> tuple[float, float]:
    """The ``1 - alpha`` interval of a rate: the mean of per-unit scores in [0, 1].

    All 0/1 (agreement, accuracy, a harmless verdict): Wilson's score interval. Fractional
    scores (a win rate with ties counted half): the BCa bootstrap, or Wilson on the sum of the
    scores when every unit is equal (BCa has no spread to work with there).
    """
    arr = _as_array(values, "rate_ci values")
    if np.any(arr < 0.0) or np.any(arr > 1.0):
        raise ValueError("rate_ci: scores must be in [0, 1]")
    if np.all((arr == 0.0) | (arr == 1.0)) or np.all(arr == arr[0]):
        return wilson_ci(float(arr.sum()), int(arr.size), alpha)
    return bootstrap_ci(arr, np.mean, n=n, seed=seed, alpha=alpha, method="bca")


def paired_bootstrap_diff(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    stat: Stat = np.mean,
    n: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> PairedDiff:
    """``stat(a) - stat(b)`` and its percentile interval, resampling units jointly.

    ``a[i]`` and ``b[i]`` must be measurements of the same unit ``i`` by two arms.
    """
    _check_common(n, alpha)
    xa, xb = _as_array(a, "paired_bootstrap_diff a"), _as_array(b, "paired_bootstrap_diff b")
    if xa.size != xb.size:
        raise ValueError(f"paired_bootstrap_diff: a has {xa.size} units, b has {xb.size}; pairs must align")
    sa, sb = _resampled_stats([xa, xb], stat, n, seed)
    low, high = _interval(sa - sb, alpha)
    return PairedDiff(float(stat(xa)) - float(stat(xb)), low, high, int(xa.size))


def _p_value(observed: float, null: np.ndarray, alternative: str) -> int:
    """How many null statistics are at least as extreme as ``observed``."""
    tol = 1e-12 * max(1.0, abs(observed))  # float noise must not turn a tie into a miss
    if alternative == "two-sided":
        return int(np.sum(np.abs(null) >= abs(observed) - tol))
    if alternative == "greater":
        return int(np.sum(null >= observed - tol))
    return int(np.sum(null <= observed + tol))


def paired_permutation_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n: int = 10000,
    seed: int = 0,
    alternative: str = "two-sided",
) -> PairedTest:
    """Sign-flip test of ``mean(a - b) == 0`` on paired values.

    Units with a zero difference carry no sign and are left out (counted: ``n`` of the
    result is the number kept). When ``2**units <= n`` every sign pattern is enumerated and
    the p-value is exact; otherwise ``n`` random patterns are drawn (``seed``) and
    ``p = (1 + hits) / (1 + n)``.
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (sign patterns) must be an int >= 1, got {n!r}")
    xa, xb = _as_array(a, "paired_permutation_test a"), _as_array(b, "paired_permutation_test b")
    if xa.size != xb.size:
        raise ValueError(f"paired_permutation_test: a has {xa.size} units, b has {xb.size}; pairs must align")
    d = xa - xb
    d = d[d != 0.0]
    if d.size == 0:
        return PairedTest(0.0, 1.0, 0, 0, True, alternative)
    observed = float(d.mean())
    if d.size <= 20 and 2 ** d.size <= n:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        null = signs @ d / d.size
        hits = _p_value(observed, null, alternative)
        return PairedTest(observed, hits / len(null), int(d.size), len(null), True, alternative)
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_CELLS // d.size)
    hits, done = 0, 0
    while done < n:
        k = min(rows, n - done)
        signs = rng.choice((-1.0, 1.0), size=(k, d.size))
        hits += _p_value(observed, signs @ d / d.size, alternative)
        done += k
    return PairedTest(observed, (1 + hits) / (1 + n), int(d.size), n, False, alternative)


# ----------------------------------------------------------------------------- outcomes
#: a judged comparison's outcome as a score (ties count half)
OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


# ----------------------------------------------------------------------------- over seeds
@dataclass(frozen=True)
class SeedSummary:
    """A metric over independent seeds: mean, spread and interval of the mean."""

    mean: float
    std: float  # sample standard deviation (ddof=1); NaN for one seed
    n: int
    ci_low: float  # NaN for one seed: an interval needs at least two
    ci_high: float
    method: str  # "t" | "bootstrap"


def seed_summary(values: Sequence[float], *, method: str = "t", alpha: float = 0.05,
                 n_boot: int = 2000, seed: int = 0) -> SeedSummary:
    """Mean over seeds with a Student-t (default) or percentile-bootstrap interval."""
    if method not in ("t", "bootstrap"):
        raise ValueError(f"seed_summary: method must be 't' or 'bootstrap', got {method!r}")
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"seed_summary: expected one finite number per seed, got {values!r}")
    mean, nan = float(arr.mean()), float("nan")
    if arr.size == 1:
        return SeedSummary(mean, nan, 1, nan, nan, method)
    std = float(arr.std(ddof=1))
    if method == "t":
        half = t_quantile(1.0 - alpha / 2.0, arr.size - 1) * std / math.sqrt(arr.size)
        low, high = mean - half, mean + half
    else:
        low, high = bootstrap_ci(arr, n=n_boot, seed=seed, alpha=alpha)
    return SeedSummary(mean, std, int(arr.size), float(low), float(high), method)


# ----------------------------------------------------------------------------- paired arms
@dataclass(frozen=True)
class PairedComparison:
    """Arm A minus arm B on the same prompts: bootstrap interval and sign-flip p-value."""

    mean_a: float
    mean_b: float
    diff: float  # mean_a - mean_b
    ci_low: float
    ci_high: float
    p_value: float  # two-sided unless asked otherwise
    n: int  # prompts in both arms
    only_a: int  # prompts measured in arm A alone (left out, counted)
    only_b: int
    exact: bool  # the p-value enumerated every sign pattern


def _align(arm_a: Mapping[str, float] | Sequence[float], arm_b: Mapping[str, float] | Sequence[float]
           ) -> tuple[np.ndarray, np.ndarray, int, int]:
    if isinstance(arm_a, Mapping) != isinstance(arm_b, Mapping):
        raise ValueError("paired_comparison: give both arms as mappings (prompt id -> value) or "
                         "both as equally long sequences")
    if isinstance(arm_a, Mapping):
        common = [k for k in arm_a if k in arm_b]
        a = np.array([float(arm_a[k]) for k in common])
        b = np.array([float(arm_b[k]) for k in common])
        return a, b, len(arm_a) - len(common), len(arm_b) - len(common)
    if len(arm_a) != len(arm_b):
        raise DataError(f"paired_comparison: arm A has {len(arm_a)} values and arm B {len(arm_b)}; "
                        "paired values must be measured on the same prompts in the same order")
    return np.asarray(arm_a, dtype=float), np.asarray(arm_b, dtype=float), 0, 0


def paired_comparison(arm_a: Mapping[str, float] | Sequence[float],
                      arm_b: Mapping[str, float] | Sequence[float], *, n_boot: int = 2000,
                      n_perm: int = 10000, seed: int = 0, alpha: float = 0.05,
                      alternative: str = "two-sided") -> PairedComparison:
    """Compare two arms measured on the same prompts (per-prompt RM scores, win scores, ...).

    Mappings are joined on prompt id (prompts in one arm only are counted in ``only_a`` /
    ``only_b``); sequences must align. The interval is a paired bootstrap of the difference of
    means, the p-value a paired sign-flip test (above)."""
    a, b, only_a, only_b = _align(arm_a, arm_b)
    if a.size == 0:
        raise DataError(f"paired_comparison: the arms share no prompt (arm A has {only_a}, arm B "
                        f"{only_b}); compare arms evaluated on the same prompts")
    diff = paired_bootstrap_diff(a, b, n=n_boot, seed=seed, alpha=alpha)
    test = paired_permutation_test(a, b, n=n_perm, seed=seed, alternative=alternative)
    return PairedComparison(float(a.mean()), float(b.mean()), diff.diff, diff.ci_low, diff.ci_high,
                            test.p_value, int(a.size), only_a, only_b, test.exact)


# ----------------------------------------------------------------------------- Student's t
# Student's t distribution (CDF and quantile) in pure Python, for intervals over seeds.
#
# scipy is not a dependency of cai; the t interval over a handful of seeds needs only
# ``t_quantile``. The CDF goes through the regularised incomplete beta function, evaluated by its
# continued fraction (modified Lentz method), and the quantile inverts the CDF by bisection.
# Accurate to ~1e-12 against published tables (see tests/test_evaluate.py).
__all__ = ["t_cdf", "t_quantile"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300

    def guard(v: float) -> float:
        return tiny if abs(v) < tiny else v

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a - 1.0 + m2) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + 1.0 + m2))):
            d = 1.0 / guard(1.0 + num * d)
            c = guard(1.0 + num / c)
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """Inverse of :func:`t_cdf` (bisection to machine precision)."""
    if not 0.0 < q < 1.0 or df <= 0:
        raise ValueError(f"t_quantile: need 0 < q < 1 and df > 0, got q={q!r}, df={df!r}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)
