"""Pure math of the metrics against closed forms and brute-force definitions."""

import math

import numpy as np
import pytest
import scipy.linalg

from harness.metrics import frechet
from harness.metrics.bootstrap import bootstrap_ci, mean_ci, recentred_interval
from harness.metrics.cluster_kl import clusters_for, js, kl, smooth


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_diagonal_gaussians_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_general_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    s1, s2 = _spd(rng, 6), _spd(rng, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


def test_frechet_identical_and_rank_deficient_is_zero_not_negative():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 50))  # 5 samples in 50 dims: singular covariance
    mu, cov = frechet.mean_cov(x)
    d = frechet.frechet_distance(mu, cov, mu, cov)
    assert d >= 0 and d < 1e-9


def test_frechet_from_features_small_n_route_equals_covariance_route():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((12, 30)), rng.standard_normal((15, 30)) + 0.3
    (m1, s1), (m2, s2) = frechet.mean_cov(x), frechet.mean_cov(y)
    assert frechet.frechet_distance_features(x, y) == pytest.approx(frechet.frechet_distance(m1, s1, m2, s2),
                                                                    rel=1e-6)


def test_mean_cov_from_running_sums():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 4)) * 3 + 5
    mu, cov = frechet.mean_cov_from_sums(x.sum(0), x.T @ x, len(x))
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-10)


def test_mmd2_unbiased_matches_brute_force():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((5, 3))
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    sxx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    syy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    sxy = sum(k(a, b) for a in x for b in y) / 30
    got = frechet.mmd2_unbiased(frechet.polynomial_kernel(x, x), frechet.polynomial_kernel(y, y),
                                frechet.polynomial_kernel(x, y))
    assert got == pytest.approx(sxx + syy - 2 * sxy, rel=1e-10)


def test_kid_near_zero_for_one_distribution_larger_when_shifted():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((200, 8)), rng.standard_normal((200, 8))
    same, same_std = frechet.kid(x, y, subsets=20, subset_size=100)
    shifted, _ = frechet.kid(x, y + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 20 * max(abs(same), same_std)


def test_cmmd_zero_for_identical_and_matches_definition():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((9, 4)) + 2
    assert frechet.cmmd(x, x) == 0.0
    g = 1 / (2 * 10.0**2)
    k = lambda a, b: np.exp(-g * ((a[:, None] - b[None]) ** 2).sum(-1)).mean()  # noqa: E731
    assert frechet.cmmd(x, y) == pytest.approx(1000 * (k(x, x) + k(y, y) - 2 * k(x, y)), rel=1e-9)
    assert frechet.cmmd(x, y + 1) > frechet.cmmd(x, y) > 0


def test_prdc_identical_and_disjoint():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 3))
    same = frechet.prdc(x, x.copy(), k=3)
    assert same["precision"] == 1 and same["recall"] == 1 and same["coverage"] == 1
    far = frechet.prdc(x, x + 100, k=3)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(ValueError, match="more than k=3"):
        frechet.prdc(x[:3], x[:3], k=3)


def test_kl_js_hand_computed():
    p, q = [0.5, 0.5], [0.25, 0.75]
    assert kl(p, q) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    assert kl(p, p) == 0.0
    assert kl([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert kl([0.5, 0.5], [1, 0]) == math.inf
    assert js([1, 0], [0, 1]) == pytest.approx(math.log(2))
    assert js(p, q) == pytest.approx(js(q, p))
    m = [0.375, 0.625]
    assert js(p, q) == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m))
    with pytest.raises(ValueError, match="shapes differ"):
        kl([0.5, 0.5], [1.0])


def test_smoothing_keeps_empty_cells_finite():
    np.testing.assert_allclose(smooth([3, 0, 1], alpha=1), [4 / 7, 1 / 7, 2 / 7])
    assert math.isfinite(kl(smooth([5, 0]), smooth([0, 5])))
    with pytest.raises(ValueError, match="alpha"):
        smooth([0, 0], alpha=0)


def test_clusters_for_grows_with_data_within_bounds():
    ks = [clusters_for(n, k_max=20) for n in (1, 2, 8, 50, 200, 10_000)]
    assert ks == sorted(ks) and ks[0] == 1 and ks[-1] == 20


def test_bootstrap_intervals():
    rng = np.random.default_rng(8)
    small, big = rng.normal(5, 1, 30), rng.normal(5, 1, 3000)
    a, b = mean_ci(small, seed=0), mean_ci(big, seed=0)
    assert a["ci_low"] < small.mean() < a["ci_high"]
    assert (b["ci_high"] - b["ci_low"]) < (a["ci_high"] - a["ci_low"]) / 5
    r1 = bootstrap_ci(lambda u, v: u.mean() - v.mean(), [small, small + 1], n_boot=50, seed=3)
    r2 = bootstrap_ci(lambda u, v: u.mean() - v.mean(), [small, small + 1], n_boot=50, seed=3)
    assert r1 == r2 and r1["ci_low"] < -1 < r1["ci_high"]
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(np.mean, [small], alpha=1.5)


def test_set_statistic_interval_contains_its_estimate():
    """Resamples duplicate rows, which makes two sets look further apart: FID of two halves of one
    Gaussian sample had its whole percentile interval above the estimate. Recentred, it contains it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4))
    fid = frechet.frechet_distance_features
    est = fid(x[:100], x[100:])
    ci = bootstrap_ci(fid, [x[:100], x[100:]], n_boot=100, seed=0, lower=0.0)
    assert ci["ci_low"] <= est <= ci["ci_high"] and ci["ci_low"] >= 0.0
    reps = [fid(a[rng.integers(0, 100, 100)], b[rng.integers(0, 100, 100)]) for a, b in [(x[:100], x[100:])] * 50]
    assert np.quantile(reps, 0.025) > est  # the plain percentile interval would have excluded it
    same = bootstrap_ci(fid, [x[:100], x[:100]], n_boot=50, seed=0, lower=0.0)
    assert same["ci_low"] == 0.0 and same["ci_high"] > 0.0


def test_recentred_interval_keeps_spread_moves_location_and_clips():
    lo, hi, sd = recentred_interval(1.0, [2.0, 3.0, 4.0, 5.0, 6.0], 0.5)
    assert (lo, hi) == pytest.approx((0.0, 2.0)) and sd > 0
    assert recentred_interval(0.1, [2.0, 3.0, 4.0], 0.5, lower=0.0)[0] == 0.0
    assert recentred_interval(0.9, [0.0, 0.5, 1.0], 0.1, upper=1.0)[1] == 1.0
    assert recentred_interval(1.0, [np.nan, 2.0], 0.05) == (None, None, None)
    assert recentred_interval(float("nan"), [1.0, 2.0], 0.05) == (None, None, None)
