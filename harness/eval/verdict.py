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

from harness.metrics.bootstrap import permutation_halfwidth

BETTER, WORSE, INCONCLUSIVE = "better", "worse", "inconclusive"


def _finite(*xs: float | None) -> bool:
    return all(x is not None and math.isfinite(float(x)) for x in xs)


def paired_mean_diff(base: Sequence[float], cand: Sequence[float], *, n_perm: int = 1000,
                     alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``cand - base`` over paired samples (same prompt and seed), with the interval of a
    sign-flip permutation test: ``mean ± q``, where q is the critical |mean| when each pair's two
    images are swapped by a fair coin. If the two models are one distribution, each difference is as
    likely to have either sign, so "better/worse" comes out at most ``alpha`` of the time, at any N
    (the percentile bootstrap is too narrow at small N: 5.5-7% false verdicts at N = 30). Pairing
    removes the prompt-to-prompt spread, so this is much tighter than comparing two independent
    intervals."""
    a = np.asarray(base, dtype=np.float64)
    b = np.asarray(cand, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_mean_diff: base and cand must be 1-D and the same length, "
                         f"got shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)  # a sample marked NaN/Inf drops out of both sides
    d = b[keep] - a[keep]
    if d.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(d.mean())
    if d.size == 1:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    for i in range(0, n_perm, 256):  # chunks keep the sign matrix small
        signs = rng.integers(0, 2, (min(256, n_perm - i), d.size)) * 2 - 1
        null[i:i + len(signs)] = (signs * d).mean(axis=1)
    q = permutation_halfwidth(mean, null, alpha)
    return mean, mean - q, mean + q


def paired_set_permutation(stat, ref: np.ndarray, base: np.ndarray, cand: np.ndarray, *, n_perm: int = 200,
                           alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """``d = stat(ref, cand) - stat(ref, base)`` for a set-vs-set statistic (FID, KID, CMMD) with an
    interval from a permutation null.

    Why not a bootstrap: resampling with replacement duplicates rows, which biases plug-in set
    statistics by an amount that depends on the set, so a bootstrap of ``d`` is not centred on the
    truth and its verdicts are not calibrated. Rows of ``base`` and ``cand`` are paired (same prompt
    and seed); if the two models make the same distribution, swapping the two images of any pair
    changes nothing in distribution. Each replicate swaps a random half of the pairs (a fair coin per
    pair) and recomputes ``d``: that is the null distribution of ``d`` at this N and this reference,
    symmetric about 0 (swapping the complement negates ``d``). The interval is ``d ± q`` with q the
    test's critical |d|, so it contains ``d`` and excludes 0 exactly when the permutation test
    rejects at level ``alpha``: a verdict from it says "better/worse" for two samples
    of one model at most ``alpha`` of the time (``benchmarks/calibration.py`` measures it)."""
    ref, base, cand = (np.asarray(a) for a in (ref, base, cand))
    if len(base) != len(cand):
        raise ValueError(f"paired_set_permutation: base and cand must be paired rows, got {len(base)} and {len(cand)}")
    d = float(stat(ref, cand) - stat(ref, base))
    if len(ref) < 2 or len(base) < 2 or not math.isfinite(d):
        return d, math.nan, math.nan
    rng = np.random.default_rng(seed)
    null = []
    for _ in range(n_perm):
        swap = rng.random(len(base)) < 0.5
        b, c = np.where(swap[:, None], cand, base), np.where(swap[:, None], base, cand)
        null.append(stat(ref, c) - stat(ref, b))
    null = np.asarray(null, dtype=np.float64)
    if np.isfinite(null).sum() < 2:
        return d, math.nan, math.nan
    q = permutation_halfwidth(d, null, alpha)  # the null is symmetric about 0: swapping the complement negates d
    return d, d - q, d + q


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
    evaluated: bool = True  # False: the metric has no value here (too few images, ...): neither pass nor FAIL
    reason: str | None = None  # why it was not evaluated

    @property
    def result(self) -> str:
        return "not evaluated" if not self.evaluated else "pass" if self.passed else "FAIL"

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
