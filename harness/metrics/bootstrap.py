"""Percentile bootstrap confidence intervals.

Each set is resampled with replacement independently (two-sample metrics resample both sets), the
statistic is recomputed, and the alpha/2 and 1 - alpha/2 quantiles of the replicates give the
interval. Seeded, so a result is reproducible. For FID-type statistics the replicates are biased
upward by the duplicated samples; the interval is reported as computed (its width is the point:
small sets give wide intervals).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


def bootstrap_ci(stat: Callable[..., float], samples: Sequence[np.ndarray], *, n_boot: int = 200,
                 alpha: float = 0.05, seed: int = 0) -> dict:
    """``stat(*resampled)`` over ``n_boot`` resamples -> {ci_low, ci_high, boot_std, n_boot, alpha}."""
    if not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha}")
    if n_boot < 2:
        raise ValueError(f"bootstrap_ci: n_boot must be >= 2, got {n_boot}")
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        resampled = [s[rng.integers(0, len(s), len(s))] for s in samples]
        reps.append(stat(*resampled))
    if reps and isinstance(reps[0], dict):  # several statistics from one resample (e.g. PRDC)
        per = {k: _interval([r[k] for r in reps], alpha) for k in reps[0]}
        return {"ci_low": {k: v[0] for k, v in per.items()}, "ci_high": {k: v[1] for k, v in per.items()},
                "boot_std": {k: v[2] for k, v in per.items()}, "n_boot": n_boot, "alpha": alpha,
                "ci_method": "percentile bootstrap"}
    lo, hi, sd = _interval(reps, alpha)
    return {"ci_low": lo, "ci_high": hi, "boot_std": sd, "n_boot": n_boot, "alpha": alpha,
            "ci_method": "percentile bootstrap"}


def _interval(values, alpha: float) -> tuple[float | None, float | None, float | None]:
    r = np.asarray(values, dtype=np.float64)
    r = r[np.isfinite(r)]
    if len(r) < 2:
        return None, None, None
    lo, hi = np.quantile(r, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi), float(r.std(ddof=1))


def mean_ci(values: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Bootstrap interval of a mean of per-image values (vectorised: fast for thousands of resamples)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return {"ci_low": None, "ci_high": None, "boot_std": None, "n_boot": n_boot, "alpha": alpha}
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for i in range(0, n_boot, 256):  # chunks keep the index matrix small
        idx = rng.integers(0, len(v), (min(256, n_boot - i), len(v)))
        means[i:i + len(idx)] = v[idx].mean(1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"ci_low": float(lo), "ci_high": float(hi), "boot_std": float(means.std(ddof=1)),
            "n_boot": n_boot, "alpha": alpha, "ci_method": "percentile bootstrap"}
