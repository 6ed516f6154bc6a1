"""``ArtifactScore``: the learned artifact estimator as a torchmetrics metric (lower = fewer artifacts).

    metric = ArtifactScore("runs/estimator", vae_source="path/to/sd")   # or estimator=ArtifactEstimator
    metric.update(images_uint8)              # [N, 3, H, W]
    metric.compute()                         # mean predicted rating
    metric.compute_ci(n_boot=1000, alpha=0.05, seed=0)   # {"value", "ci_low", "ci_high", "n", ...}
    metric.per_image()                       # every image's score, in update order
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from harness.errors import HarnessError
from harness.estimator.score import ArtifactEstimator


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                 stat=np.mean) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(values)`` at level 1 - ``alpha``."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise HarnessError("bootstrap: no values (call update() first)")
    if n_boot < 1 or not 0 < alpha < 1:
        raise HarnessError(f"bootstrap: expected n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    stats = stat(values[idx], axis=1)
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


class ArtifactScore(Metric):
    """Mean predicted artifact rating of final images, with per-image scores kept for a bootstrap CI."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, estimator: str | Path | ArtifactEstimator, *, vae=None, vae_source: str | Path | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 32, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(estimator, ArtifactEstimator):
            estimator = ArtifactEstimator.load(estimator, vae=vae, vae_source=vae_source, device=device)
        self._estimator = estimator
        self.batch_size = batch_size
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    def update(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise HarnessError(f"images: expected a [N, 3, H, W] tensor (uint8 or float in [0, 1]), got {shape}")
        self.scores.append(self._estimator.score_images(images, self.batch_size).to(self.device))

    def per_image(self) -> torch.Tensor:
        return dim_zero_cat(self.scores) if self.scores else torch.zeros(0)

    def compute(self) -> torch.Tensor:
        s = self.per_image()
        if s.numel() == 0:
            raise HarnessError("ArtifactScore: no images (call update() first)")
        return s.float().mean()

    def compute_ci(self, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
        """The same result shape as the metrics stage's ``compute_ci`` (value, ci_low, ci_high, n, ...)."""
        scores = self.per_image().cpu().numpy()
        lo, hi = bootstrap_ci(scores, n_boot, alpha, seed)
        return {"metric": "artifact_score", "value": float(self.compute()), "ci_low": lo, "ci_high": hi,
                "n_a": len(scores), "n_b": None, "n_boot": n_boot, "alpha": alpha, "ci_method": "percentile bootstrap",
                "per_image": scores.tolist(), "estimator": {"clip": self._estimator.cfg.clip,
                                                            "preview": self._estimator.cfg.preview,
                                                            "head": self._estimator.cfg.head}}
