"""Bootstrap confidence intervals that contain their own estimate.

Each set is resampled with replacement independently (two-sample metrics resample both sets) and the
statistic recomputed. For plug-in set statistics (FID, KID, CMMD, PRDC, cluster KL) the replicates
are biased: a resample repeats about a third of its rows, and duplicated rows make two sets look
*further apart* (two identical sets have KL 0, their resamples do not). So the plain percentile
interval sits above its estimate, and can exclude it ([0.12, 0.29] around a KL of 0).

``recentred_interval`` keeps what the bootstrap measures well, the spread of the statistic, and drops
what it measures badly, its location: the interval is the estimate minus/plus the distances from the
replicates' median to their alpha/2 and 1 - alpha/2 quantiles, clipped to the statistic's range (a
divergence is never negative). It always contains the estimate. It is an interval for the value this
statistic takes at this N (what a rerun with new seeds gives), not for its infinite-sample value:
plug-in FID/KL are biased upward at finite N, so compare rows only at equal N. For a mean of
per-image values (``mean_ci``) the bootstrap is unbiased and the percentile interval is kept.

Differences between two models, which decide verdicts, use a permutation null instead
(``harness.eval.verdict.paired_set_permutation``). Seeded, so a result is reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

RECENTRED = "bootstrap spread recentred on the estimate"


def recentred_interval(estimate: float, replicates, alpha: float, *, lower: float | None = None,
                       upper: float | None = None) -> tuple[float | None, float | None, float | None]:
    """(low, high, std) of ``replicates`` moved so their median sits on ``estimate``; clipped to
    [lower, upper]. None when fewer than 2 finite replicates or the estimate is not finite."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if len(r) < 2 or estimate is None or not np.isfinite(estimate):
        return None, None, None
    q_lo, q_mid, q_hi = np.quantile(r, [alpha / 2, 0.5, 1 - alpha / 2])
    lo, hi = estimate - (q_mid - q_lo), estimate + (q_hi - q_mid)
    if lower is not None:
        lo = max(lo, lower)
    if upper is not None:
        hi = min(hi, upper)
    return float(min(lo, estimate)), float(max(hi, estimate)), float(r.std(ddof=1))


def bootstrap_ci(stat: Callable[..., float], samples: Sequence[np.ndarray], *, n_boot: int = 200,
                 alpha: float = 0.05, seed: int = 0, lower: float | None = None,
                 upper: float | None = None, estimate: float | dict | None = None) -> dict:
    """``stat(*resampled)`` over ``n_boot`` resamples -> {ci_low, ci_high, boot_std, n_boot, alpha,
    ci_method}, recentred on ``estimate`` (default ``stat(*samples)``; see the module docstring).
    ``lower``/``upper``: the statistic's range (a scalar, or a dict per key for statistics that
    return several values)."""
    if not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha}")
    if n_boot < 2:
        raise ValueError(f"bootstrap_ci: n_boot must be >= 2, got {n_boot}")
    estimate = stat(*samples) if estimate is None else estimate
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        resampled = [s[rng.integers(0, len(s), len(s))] for s in samples]
        reps.append(stat(*resampled))
    out = {"n_boot": n_boot, "alpha": alpha, "ci_method": RECENTRED}
    if isinstance(estimate, dict):  # several statistics from one resample (e.g. PRDC)
        def bound(b, k):
            return b.get(k) if isinstance(b, dict) else b

        per = {k: recentred_interval(float(estimate[k]), [r[k] for r in reps], alpha, lower=bound(lower, k),
                                     upper=bound(upper, k)) for k in estimate}
        return {"ci_low": {k: v[0] for k, v in per.items()}, "ci_high": {k: v[1] for k, v in per.items()},
                "boot_std": {k: v[2] for k, v in per.items()}, **out}
    lo, hi, sd = recentred_interval(float(estimate), reps, alpha, lower=lower, upper=upper)
    return {"ci_low": lo, "ci_high": hi, "boot_std": sd, **out}


def permutation_halfwidth(observed: float, null, alpha: float) -> float:
    """Critical |difference| of a two-sided permutation test at level ``alpha``. The observed value
    is one member of the permutation set (the identity), which keeps the test exact with a finite
    number of replicates; "higher" rounding never rejects more often than ``alpha``."""
    null = np.asarray(null, dtype=np.float64)
    null = np.abs(np.concatenate([[observed], null[np.isfinite(null)]]))
    return float(np.quantile(null, 1 - alpha, method="higher"))


def mean_ci(values: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Percentile bootstrap interval of a mean of per-image values (vectorised: fast for thousands of
    resamples). A resampled mean is unbiased, so the percentile interval needs no recentring."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return {"ci_low": None, "ci_high": None, "boot_std": None, "n_boot": n_boot, "alpha": alpha}
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for i in range(0, n_boot, 256):  # chunks keep the index matrix small
        idx = rng.integers(0, len(v), (min(256, n_boot - i), len(v)))
        means[i:i + len(idx)] = v[idx].mean(1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    m = float(v.mean())  # quantiles of a few hundred means can miss the mean of a tiny, skewed set
    return {"ci_low": min(float(lo), m), "ci_high": max(float(hi), m), "boot_std": float(means.std(ddof=1)),
            "n_boot": n_boot, "alpha": alpha, "ci_method": "percentile bootstrap"}
