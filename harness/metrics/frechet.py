"""Pure math for set-vs-set metrics (numpy float64, no torch state).

* Fréchet distance ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2). The trace of the square root
  is computed stably as a sum of square roots of eigenvalues of the symmetric PSD matrix
  sqrt(S1) S2 sqrt(S1) (eigh, negatives from round-off clipped to 0), never through a general
  ``sqrtm`` that can go complex. From features with fewer samples than dimensions it is the
  nuclear norm of the n1 x n2 matrix Xc1 Xc2^T / sqrt((n1-1)(n2-1)), which is exact and cheap.
* KID: unbiased MMD^2 with the polynomial kernel (x.y / d + 1)^3, averaged over random subsets.
* CMMD: MMD^2 with a Gaussian RBF kernel (sigma 10, scaled by 1000) as in "Rethinking FID" (2024).
* PRDC: precision / recall / density / coverage with k nearest neighbours (Naeem et al., 2020).
"""

from __future__ import annotations

import numpy as np


def mean_cov(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    return x.mean(0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def mean_cov_from_sums(total: np.ndarray, outer: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """From the running sums sum(x) and sum(x x^T) of n samples (unbiased covariance)."""
    mu = np.asarray(total, dtype=np.float64) / n
    cov = (np.asarray(outer, dtype=np.float64) - n * np.outer(mu, mu)) / max(n - 1, 1)
    return mu, (cov + cov.T) / 2


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrt(S1 S2) for symmetric PSD S1, S2 (eigenvalues of S1 S2 are those of sqrt(S1) S2 sqrt(S1))."""
    r = _psd_sqrt(np.asarray(s1, dtype=np.float64))
    m = r @ np.asarray(s2, dtype=np.float64) @ r
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64, never negative or complex."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    s1, s2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))
    return max(d, 0.0)


def frechet_distance_features(x1: np.ndarray, x2: np.ndarray) -> float:
    """Fréchet distance of two feature sets' Gaussians; the n x n route when n is below the dimension."""
    x1, x2 = np.asarray(x1, dtype=np.float64), np.asarray(x2, dtype=np.float64)
    n1, n2, d = len(x1), len(x2), x1.shape[1]
    if n1 < 2 or n2 < 2:
        raise ValueError(f"frechet_distance_features: need at least 2 samples per set, got {n1} and {n2}")
    mu1, mu2 = x1.mean(0), x2.mean(0)
    if min(n1, n2) >= d:
        return frechet_distance(mu1, np.cov(x1, rowvar=False), mu2, np.cov(x2, rowvar=False))
    a, b = (x1 - mu1) / np.sqrt(n1 - 1), (x2 - mu2) / np.sqrt(n2 - 1)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    dist = ((mu1 - mu2) ** 2).sum() + (a * a).sum() + (b * b).sum() - 2 * nuclear
    return max(float(dist), 0.0)


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> np.ndarray:
    return (x @ y.T / x.shape[1] + coef) ** degree


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m, n = len(kxx), len(kyy)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kid(x: np.ndarray, y: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        coef: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of unbiased polynomial MMD^2 over random subsets."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"kid: need at least 2 samples per set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), size, replace=False)]
        b = y[rng.choice(len(y), size, replace=False)]
        k = lambda u, v: polynomial_kernel(u, v, degree, coef)  # noqa: E731
        vals.append(mmd2_unbiased(k(a, a), k(b, b), k(a, b)))
    v = np.asarray(vals)
    return float(v.mean()), float(v.std(ddof=1) if len(v) > 1 else 0.0)


def _rbf_mean(x: np.ndarray, y: np.ndarray, gamma: float, block: int = 2048) -> float:
    """mean over all pairs of exp(-gamma |x_i - y_j|^2), in blocks so memory stays bounded."""
    total = 0.0
    y2 = (y * y).sum(1)
    for i in range(0, len(x), block):
        xb = x[i:i + block]
        d2 = (xb * xb).sum(1)[:, None] + y2[None, :] - 2 * xb @ y.T
        total += np.exp(-gamma * np.clip(d2, 0, None)).sum()
    return total / (len(x) * len(y))


def cmmd(x: np.ndarray, y: np.ndarray, *, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """CMMD as in the paper's reference code: scale * MMD^2 (all pairs, V-statistic), Gaussian RBF."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    gamma = 1.0 / (2 * sigma**2)
    v = _rbf_mean(x, x, gamma) + _rbf_mean(y, y, gamma) - 2 * _rbf_mean(x, y, gamma)
    return float(scale * max(v, 0.0))


def _pairwise(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.sqrt(np.clip(d2, 0, None))


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density, coverage (Naeem et al. 2020) with k-NN balls."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"prdc: need more than k={k} samples per set, got {len(real)} and {len(fake)}")
    rr, ff, rf = _pairwise(real, real), _pairwise(fake, fake), _pairwise(real, fake)
    r_rad = np.sort(rr, axis=1)[:, k]  # column 0 is the point itself
    f_rad = np.sort(ff, axis=1)[:, k]
    inside = rf < r_rad[:, None]  # [real, fake]: fake j inside real i's ball
    return {
        "precision": float(inside.any(0).mean()),
        "recall": float((rf < f_rad[None, :]).any(1).mean()),
        "density": float(inside.sum(0).mean() / k),
        "coverage": float((rf.min(1) < r_rad).mean()),
    }
