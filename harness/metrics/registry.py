"""Names used in eval suites -> metric classes.

Values are classes or lazy ``"module:Class"`` paths (imported on first use), so a later stage's
metric (e.g. the artifact estimator's) registers with one line here or with :func:`register_metric`
without this module importing it.
"""

from __future__ import annotations

import importlib

from harness.errors import HarnessError

METRICS: dict[str, str | type] = {
    "fid": "harness.metrics.fid:FID",
    "fid_clip": "harness.metrics.fid:FIDClip",
    "fid_clip_l2": "harness.metrics.fid:FIDClipL2",
    "fid_dinov2": "harness.metrics.fid:FIDDinov2",
    "kid": "harness.metrics.fid:KID",
    "cmmd": "harness.metrics.fid:CMMD",
    "prdc": "harness.metrics.prdc:PRDC",
    "clip_score": "harness.metrics.clip_score:CLIPScore",
    "cluster_kl": "harness.metrics.cluster_kl:ClusterKL",
    # The learned artifact estimator's metric (estimator stage): per-image rating, compute_ci -> dict.
    "artifact_score": "harness.estimator.metric:ArtifactScore",
}

# Set-vs-set metrics computed from one shared feature pass (harness.metrics.score.score_sets).
# Each brings its own extractor (``default_extractor``: Inception, CLIP ViT-B/32, DINOv2 ViT-L/14, ...).
FEATURE_METRICS = ("fid", "fid_clip", "fid_clip_l2", "fid_dinov2", "kid", "cmmd", "prdc")


def register_metric(name: str, target: str | type) -> None:
    """Add ``name`` -> class (or ``"module:Class"``), e.g. ``register_metric("artifact", "harness.estimator...")``."""
    METRICS[name] = target


def get_metric_class(name: str) -> type:
    if name not in METRICS:
        raise HarnessError(f"metric {name!r}: unknown; known: {', '.join(sorted(METRICS))}")
    target = METRICS[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        try:
            target = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise HarnessError(f"metric {name!r}: {METRICS[name]} is not available ({e})") from e
        METRICS[name] = target
    return target


def build_metric(name: str, *args, **kwargs):
    return get_metric_class(name)(*args, **kwargs)
