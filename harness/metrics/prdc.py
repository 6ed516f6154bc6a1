"""Precision / recall / density / coverage (Naeem et al. 2020) on the shared features."""

from __future__ import annotations

import torch

from harness.metrics import frechet
from harness.metrics.base import record
from harness.metrics.bootstrap import bootstrap_ci
from harness.metrics.fid import FeatureSetMetric

KEYS = ("precision", "recall", "density", "coverage")


class PRDC(FeatureSetMetric):
    """``compute()`` -> dict of the four; ``compute_ci`` -> value / ci_low / ci_high as dicts by key.

    Pairwise distances are n x n: keep ``max_samples`` modest (default 10,000)."""

    higher_is_better = True
    reference = ("Naeem et al. 2020 (clovaai/generative-evaluation-prdc), k=5; the paper embeds with VGG16 fc2, "
                 "harness defaults to Inception pool3 (no VGG extractor)")

    def __init__(self, extractor=None, *, k: int = 5, max_samples: int = 10_000, **kwargs):
        super().__init__(extractor, max_samples=max_samples, **kwargs)
        self.k = k

    def statistic(self, real, fake) -> dict:
        return frechet.prdc(real, fake, self.k)

    def compute(self):
        self._check_counts(self.k + 1)
        return {k: torch.tensor(v) for k, v in self.statistic(self.features("real"), self.features("fake")).items()}

    def compute_ci(self, n_boot: int = 100, alpha: float = 0.05, seed: int = 0) -> dict:
        with self.sync_context():
            self._check_counts(self.k + 1)
            real, fake = self.features("real"), self.features("fake")
            value = self.statistic(real, fake)
            # precision, recall and coverage are shares; density (a mean count ratio) has no upper bound
            ci = bootstrap_ci(self.statistic, [real, fake], n_boot=n_boot, alpha=alpha, seed=seed, lower=0.0,
                              upper={"precision": 1.0, "recall": 1.0, "coverage": 1.0}, estimate=value)
            n_a, n_b = self.counts()
            return record("prdc", value, n_a=n_a, n_b=n_b, ci=ci, extra={**self._describe(), "k": self.k})
