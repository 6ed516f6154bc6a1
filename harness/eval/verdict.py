"""Better / worse / inconclusive, decided from confidence intervals of the difference.

A candidate is "better" only when the whole interval of (candidate - base) lies on the good side of
zero (or of a practical margin); an interval that straddles it is "inconclusive", whatever the point
estimate says. Small image sets give wide intervals, and the report says so instead of guessing.

Pure functions on numbers and arrays: no files, no models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BETTER, WORSE, INCONCLUSIVE = "better", "worse", "inconclusive"


def _finite(*xs: float | None) -> bool:
    return all(x is not None and math.isfinite(float(x)) for x in xs)


def paired_bootstrap_diff(base: Sequence[float], cand: Sequence[float], *, n_boot: int = 1000,
                          alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``cand - base`` over paired samples (same prompt and seed) with a percentile bootstrap
    interval. Pairing removes the prompt-to-prompt spread, so it is much tighter than comparing two
    independent intervals."""
    a = np.asarray(base, dtype=np.float64)
    b = np.asarray(cand, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap_diff: base and cand must be 1-D and the same length, "
                         f"got shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)  # a sample marked NaN/Inf drops out of both sides
    d = b[keep] - a[keep]
    if d.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(d.mean())
    if d.size == 1:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    boots = d[idx].mean(axis=1)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return mean, float(lo), float(hi)


def paired_set_bootstrap(stat, ref: np.ndarray, base: np.ndarray, cand: np.ndarray, *, n_boot: int = 100,
                         alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """``stat(ref, cand) - stat(ref, base)`` for a set-vs-set statistic (FID, KID, CMMD) with a
    bootstrap interval. Rows of ``base`` and ``cand`` are paired (same prompt and seed), so they are
    resampled with the same indices; the shared reference is resampled once per replicate for both."""
    ref, base, cand = (np.asarray(a) for a in (ref, base, cand))
    if len(base) != len(cand):
        raise ValueError(f"paired_set_bootstrap: base and cand must be paired rows, got {len(base)} and {len(cand)}")
    d = float(stat(ref, cand) - stat(ref, base))
    if len(ref) < 2 or len(base) < 2:
        return d, math.nan, math.nan
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        r = ref[rng.integers(0, len(ref), len(ref))]
        i = rng.integers(0, len(base), len(base))
        reps.append(stat(r, cand[i]) - stat(r, base[i]))
    reps = np.asarray(reps, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if len(reps) < 2:
        return d, math.nan, math.nan
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return d, float(lo), float(hi)


def diff_from_intervals(base: float, base_lo: float, base_hi: float,
                        cand: float, cand_lo: float, cand_hi: float) -> tuple[float, float, float]:
    """Interval of ``cand - base`` from two independent intervals, combining each side's half-width
    in quadrature (the normal approximation; exact for independent Gaussian estimates)."""
    diff = cand - base
    if not _finite(base, cand):
        return math.nan, math.nan, math.nan
    if not _finite(base_lo, base_hi, cand_lo, cand_hi):
        return diff, math.nan, math.nan
    down = math.hypot(cand - cand_lo, base_hi - base)
    up = math.hypot(cand_hi - cand, base - base_lo)
    return diff, diff - down, diff + up


def verdict(diff_lo: float | None, diff_hi: float | None, higher_is_better: bool | None,
            margin: float = 0.0) -> str:
    """``better`` / ``worse`` when the interval of (candidate - base) clears ``margin`` on one side,
    else ``inconclusive``. Without a direction (``higher_is_better=None``) a clear change is
    reported as ``higher`` or ``lower``."""
    if margin < 0:
        raise ValueError(f"verdict: margin must be >= 0, got {margin}")
    if not _finite(diff_lo, diff_hi):
        return INCONCLUSIVE
    if diff_lo > margin:
        up = "higher"
    elif diff_hi < -margin:
        up = "lower"
    else:
        return INCONCLUSIVE
    if higher_is_better is None:
        return up
    return BETTER if (up == "higher") == higher_is_better else WORSE


# --- gates -----------------------------------------------------------------------------------

GATE_RULES = ("min", "max", "min_mean", "max_mean", "max_increase", "max_decrease")


@dataclass(frozen=True)
class GateResult:
    gate: str          # the suite's label for the metric, e.g. "fid_clip"
    rule: str          # one of GATE_RULES
    threshold: float
    checkpoint: str
    subset: str
    value: float       # what was compared with the threshold (the metric, or its change from base)
    passed: bool

    def describe(self) -> str:
        op = ">=" if self.rule in ("min", "min_mean") else "<="
        what = {"max_increase": "increase over base", "max_decrease": "decrease from base"}.get(self.rule, "value")
        return f"{what} {self.value:.4g} {op} {self.threshold:g}"


def check_gate(rule: str, threshold: float, value: float, base_value: float | None = None) -> tuple[float, bool]:
    """Apply one gate rule. Returns (the number compared, passed). A NaN never passes: a gate
    that cannot be evaluated must not let a checkpoint through."""
    if rule not in GATE_RULES:
        raise ValueError(f"check_gate: unknown rule {rule!r}; known rules: {', '.join(GATE_RULES)}")
    if rule in ("max_increase", "max_decrease"):
        if base_value is None:
            raise ValueError(f"check_gate: rule {rule!r} needs the base model's value")
        compared = value - base_value if rule == "max_increase" else base_value - value
    else:
        compared = value
    if not _finite(compared):
        return float(compared) if compared is not None else math.nan, False
    if rule in ("min", "min_mean"):
        return compared, compared >= threshold
    return compared, compared <= threshold
