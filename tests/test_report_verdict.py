import math

import numpy as np
import pytest

from harness.eval.verdict import (
    check_gate,
    diff_from_intervals,
    paired_mean_diff,
    paired_set_permutation,
    verdict,
)


def test_verdict_directions():
    assert verdict(0.5, 2.0, higher_is_better=True) == "better"
    assert verdict(0.5, 2.0, higher_is_better=False) == "worse"
    assert verdict(-2.0, -0.5, higher_is_better=False) == "better"
    assert verdict(-2.0, -0.5, higher_is_better=True) == "worse"
    assert verdict(-0.5, 2.0, higher_is_better=True) == "inconclusive"
    assert verdict(0.5, 2.0, higher_is_better=None) == "higher"


def test_verdict_margin_and_nan():
    assert verdict(0.5, 2.0, True, margin=1.0) == "inconclusive"
    assert verdict(1.5, 2.0, True, margin=1.0) == "better"
    assert verdict(math.nan, 2.0, True) == "inconclusive"
    assert verdict(None, None, True) == "inconclusive"
    with pytest.raises(ValueError, match="margin must be >= 0"):
        verdict(0, 1, True, margin=-1)


def test_paired_bootstrap_detects_shift_that_independent_cis_miss():
    rng = np.random.default_rng(0)
    base = rng.normal(25, 5, 40)  # large prompt-to-prompt spread
    cand = base + 0.5 + rng.normal(0, 0.2, 40)  # small consistent improvement
    d, lo, hi = paired_mean_diff(base, cand, n_perm=500, seed=1)
    assert d == pytest.approx(np.mean(cand - base))
    assert lo > 0 and lo < d < hi
    assert verdict(lo, hi, True) == "better"
    se = 5 / math.sqrt(40) * 1.96
    _, ilo, ihi = diff_from_intervals(base.mean(), base.mean() - se, base.mean() + se,
                                      cand.mean(), cand.mean() - se, cand.mean() + se)
    assert ilo < 0 < ihi  # unpaired: inconclusive


def test_paired_bootstrap_is_seeded_and_drops_nonfinite():
    a, b = [1.0, 2.0, 3.0, np.nan], [1.5, 2.5, 3.0, 9.0]
    assert paired_mean_diff(a, b, seed=3) == paired_mean_diff(a, b, seed=3)
    d, _, _ = paired_mean_diff(a, b)
    assert d == pytest.approx(1 / 3)
    assert math.isnan(paired_mean_diff([1.0], [2.0])[1])
    with pytest.raises(ValueError, match="same length"):
        paired_mean_diff([1, 2], [1])


def test_diff_from_intervals_quadrature():
    d, lo, hi = diff_from_intervals(10, 7, 13, 14, 10, 18)
    assert d == 4
    assert lo == pytest.approx(4 - 5)  # hypot(4, 3)
    assert hi == pytest.approx(4 + 5)
    assert math.isnan(diff_from_intervals(10, math.nan, 11, 12, 11, 13)[1])


@pytest.mark.parametrize("rule,thr,value,base,passed", [
    ("min", 28, 29, None, True), ("min", 28, 27.9, None, False),
    ("max", 0.3, 0.31, None, False), ("max_mean", 1.5, 1.2, None, True),
    ("max_increase", 2.0, 11.0, 10.0, True), ("max_increase", 2.0, 12.5, 10.0, False),
    ("max_decrease", 1.0, 8.0, 10.0, False), ("min", 28, math.nan, None, False),
])
def test_gates(rule, thr, value, base, passed):
    assert check_gate(rule, thr, value, base)[1] is passed


def test_gate_errors():
    with pytest.raises(ValueError, match="unknown rule 'maxx'; known rules: min"):
        check_gate("maxx", 1, 1)
    with pytest.raises(ValueError, match="needs the base model's value"):
        check_gate("max_increase", 1, 1)


def _mean_gap(a, b):
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2))


def test_paired_set_permutation_contains_its_estimate_and_is_symmetric():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(60, 3))
    base, cand = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    d, lo, hi = paired_set_permutation(_mean_gap, ref, base, cand, n_perm=200, seed=0)
    assert lo <= d <= hi and hi - d == pytest.approx(d - lo)  # the null is symmetric about 0
    assert verdict(lo, hi, higher_is_better=False) == "inconclusive"  # two draws of one distribution
    d2, lo2, hi2 = paired_set_permutation(_mean_gap, ref, base, cand + 1.0, n_perm=200, seed=0)
    assert lo2 > 0 and verdict(lo2, hi2, higher_is_better=False) == "worse"
    assert paired_set_permutation(_mean_gap, ref, base, cand, n_perm=200, seed=0) == (d, lo, hi)


def test_calibration_machinery_small_null_and_shift():
    from harness.errors import HarnessError
    from harness.eval.calibration import Study, rate, run

    study = Study(trials=20, n=30, n_ref=30, dim=3, n_perm=100, seed=0)
    for metric in ("fid", "mean"):
        null = run(study, metric, 0.0)
        assert null["decided"]["k"] <= 2, metric  # at most ~5% of 20, with room for chance
        assert null["interval_contains_estimate"] == 1.0
        shifted = run(study, metric, 1.0)
        assert shifted["right_direction"]["rate"] >= 0.9, metric
    r = rate(1, 20)
    assert r["ci_low"] < 0.05 < r["ci_high"] and rate(0, 20)["ci_low"] == 0.0
    with pytest.raises(HarnessError, match="trials=3 is too few"):
        run(Study(trials=3), "fid")
    with pytest.raises(HarnessError, match="unknown metric 'fidd'; known: fid, kid, cmmd, mean"):
        run(study, "fidd")
    with pytest.raises(HarnessError, match="n=2.*at least 4"):
        run(Study(n=2), "fid")
