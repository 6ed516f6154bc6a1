"""Evaluation metrics: FID/KID/CMMD/PRDC (one shared feature pass), CLIP score, detector-cluster KL.

Every metric is a ``torchmetrics.Metric`` with ``compute_ci(n_boot, alpha, seed)``; names used in eval
suites map to classes in :mod:`harness.metrics.registry`. Folder scoring: :mod:`harness.metrics.score`.
"""
