"""Are the verdicts calibrated? Null and planted-shift trials on synthetic features.

A verdict is only worth acting on if two samples of one model come out "inconclusive" at least
1 - alpha of the time. Each trial here draws a reference set and a paired base/candidate set (a
shared per-pair component stands for "same prompt and seed") from Gaussians, runs the verdict the
eval suite runs (``paired_set_permutation`` for set-vs-set metrics, ``paired_mean_diff`` for
per-image means), and counts false verdicts (null: candidate drawn like base) or correct ones
(power: candidate's features shifted by ``shift`` standard deviations along every axis). It also
checks every per-checkpoint interval contains its own estimate.

Pure functions on arrays; ``benchmarks/calibration.py`` runs the full study and prints the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from harness.errors import HarnessError
from harness.eval.verdict import INCONCLUSIVE, paired_mean_diff, paired_set_permutation, verdict
from harness.metrics import frechet
from harness.metrics.bootstrap import bootstrap_ci, mean_ci

MIN_TRIALS, MIN_N = 10, 4


def _fid(a, b):
    return frechet.frechet_distance_features(a, b)


def _kid(a, b):
    return frechet.kid(a, b, subsets=10, subset_size=min(len(a), len(b)), seed=0)[0]


def _cmmd(a, b):
    return frechet.cmmd(a, b, sigma=10.0)


# name -> (statistic of (reference, set), higher_is_better, floor); "mean" is a per-image score
SET_STATISTICS: dict[str, tuple[Callable, bool, float | None]] = {
    "fid": (_fid, False, 0.0),
    "kid": (_kid, False, None),
    "cmmd": (_cmmd, False, None),
}
METRICS = (*SET_STATISTICS, "mean")


@dataclass(frozen=True)
class Study:
    trials: int = 200
    n: int = 100          # images per model (paired base/candidate rows)
    n_ref: int = 100      # reference images
    dim: int = 8          # feature dimension
    pair_corr: float = 0.5  # share of a pair's variance the two models' images have in common
    n_perm: int = 200
    alpha: float = 0.05
    seed: int = 0


def check_study(study: Study, metric: str) -> None:
    """One-line errors before any work."""
    if metric not in METRICS:
        raise HarnessError(f"calibration: unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if study.trials < MIN_TRIALS:
        raise HarnessError(f"calibration: trials={study.trials} is too few for a rate; give at least {MIN_TRIALS}")
    if min(study.n, study.n_ref) < MIN_N:
        raise HarnessError(f"calibration: n={study.n}, n_ref={study.n_ref}: each set needs at least {MIN_N} samples")
    if not 0 <= study.pair_corr < 1:
        raise HarnessError(f"calibration: pair_corr={study.pair_corr}: expected a number in [0, 1)")


def draw(study: Study, rng: np.random.Generator, shift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference, base, candidate); base and candidate rows are paired through a shared component."""
    ref = rng.standard_normal((study.n_ref, study.dim))
    shared = rng.standard_normal((study.n, study.dim))
    a, b = math.sqrt(study.pair_corr), math.sqrt(1 - study.pair_corr)
    base = a * shared + b * rng.standard_normal((study.n, study.dim))
    cand = a * shared + b * rng.standard_normal((study.n, study.dim)) + shift
    return ref, base, cand


def one_trial(study: Study, metric: str, rng: np.random.Generator, shift: float, seed: int) -> dict:
    """The verdict and the per-checkpoint intervals of one draw."""
    ref, base, cand = draw(study, rng, shift)
    if metric == "mean":  # a per-image score (CLIP score, artifact score): the features' first axis
        b, c = base[:, 0], cand[:, 0]
        _, lo, hi = paired_mean_diff(b, c, n_perm=1000, alpha=study.alpha, seed=seed)
        cis = [(v.mean(), mean_ci(v, alpha=study.alpha, seed=seed)) for v in (b, c)]
        return {"verdict": verdict(lo, hi, True), "contains": all(_contains(e, ci) for e, ci in cis)}
    stat, hib, floor = SET_STATISTICS[metric]
    _, lo, hi = paired_set_permutation(stat, ref, base, cand, n_perm=study.n_perm, alpha=study.alpha, seed=seed)
    cis = [bootstrap_ci(stat, [ref, x], n_boot=50, alpha=study.alpha, seed=seed, lower=floor) for x in (base, cand)]
    ests = [stat(ref, x) for x in (base, cand)]
    return {"verdict": verdict(lo, hi, hib), "contains": all(_contains(e, ci) for e, ci in zip(ests, cis))}


def _contains(estimate: float, ci: dict) -> bool:
    return ci["ci_low"] is not None and ci["ci_low"] <= estimate <= ci["ci_high"]


def rate(successes: int, trials: int, alpha: float = 0.05) -> dict:
    """A share with its exact (Clopper-Pearson) interval."""
    from scipy.stats import beta

    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return {"rate": successes / trials, "ci_low": lo, "ci_high": hi, "k": successes, "n": trials}


def run(study: Study, metric: str, shift: float = 0.0) -> dict:
    """``trials`` draws at one shift: the share of decided verdicts (null: false verdicts), of
    verdicts in the right direction (candidate shifted away from the reference is worse), and of
    per-checkpoint intervals that contain their estimate."""
    check_study(study, metric)
    rng = np.random.default_rng(study.seed)
    decided = right = contains = 0
    for t in range(study.trials):
        res = one_trial(study, metric, rng, shift, seed=study.seed + t)
        decided += res["verdict"] != INCONCLUSIVE
        # the candidate moved away from the reference: a distance grows ("worse"); a mean score grows
        right += res["verdict"] == ("better" if metric == "mean" else "worse")
        contains += res["contains"]
    return {"metric": metric, "shift": shift, "decided": rate(decided, study.trials, study.alpha),
            "right_direction": rate(right, study.trials, study.alpha),
            "interval_contains_estimate": contains / study.trials}
