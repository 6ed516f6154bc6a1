"""Every metric of a suite, for every checkpoint and prompt set, as tidy rows with intervals.

Computed on the main process from the images on disk, so the numbers do not depend on how many
processes generated them. Three kinds of metric:

* per-image (CLIP score, artifact score): one value per generated image; a checkpoint's value is the
  mean with a bootstrap interval, and candidate - base is a *paired* bootstrap over (prompt, seed);
* set-vs-set (FID, KID, CMMD): generated images of a prompt set against the reference images; the
  difference's interval comes from a joint bootstrap (reference, base and candidate resampled
  together), since both sides share the reference;
* cluster KL: the detector-embedding-cluster divergence between the reference (original data), the
  base and each candidate, with its per-class breakdown.

The set-level metrics live in :mod:`harness.eval.set_scoring`; the shared inputs (:class:`Scoring`)
and the row format in :mod:`harness.eval.score_rows`. This module dispatches each metric to its kind.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness.errors import ConfigError
from harness.eval import layout
from harness.eval.score_rows import Scoring, _f, row, set_diff
from harness.eval.set_scoring import cluster_kl, set_metric
from harness.eval.suite import Suite
from harness.eval.verdict import paired_mean_diff

log = logging.getLogger(__name__)


# --- per-image metrics ------------------------------------------------------------------------

def per_image_rows(sc: Scoring, label: str, name: str, key: str, subsets: Sequence[str], hib: bool,
                   note: str | None = None) -> None:
    """Rows from per-image values already stored under ``key`` in the per-image records."""
    from harness.metrics.bootstrap import mean_ci

    ci = sc.suite.ci
    for subset in subsets:
        base_vals = None
        for ck in sc.ckpts:
            recs = sc.records(ck.label, subset)
            vals = np.array([np.nan if r.get(key) is None else r[key] for r in recs], dtype=np.float64)
            ok = vals[np.isfinite(vals)]
            c = mean_ci(ok, n_boot=ci.n_boot, alpha=ci.alpha, seed=ci.seed) if len(ok) else {}
            r = row(ck, label, name, subset, ok.mean() if len(ok) else None, c.get("ci_low"), c.get("ci_high"),
                    int(len(ok)), hib, note)
            if ck.role == "base":
                base_vals = vals
            elif base_vals is not None and len(base_vals) == len(vals):
                set_diff(r, paired_mean_diff(base_vals, vals, n_perm=ci.n_boot, alpha=ci.alpha, seed=ci.seed),
                         ci.margin)
            sc.rows.append(r)


def _clip_values(sc: Scoring, cls, model: str, settings: dict, images: list[Path], prompts: list[str]) -> list[float]:
    """Per-image CLIP scores; the model loads once per run (the metric is reset between sets)."""
    from harness.metrics.images import load_image

    key = ("clip_score", model, tuple(sorted((k, str(v)) for k, v in settings.items())))
    if key not in sc._extractors:
        sc._extractors[key] = cls(model, device=sc.device, **{k: v for k, v in settings.items() if k != "model"})
    metric = sc._extractors[key]
    metric.reset()
    for i in range(0, len(images), 32):
        metric.update([load_image(p) for p in images[i:i + 32]], prompts[i:i + 32])
    return [float(v) for v in metric.scores()]


def clip_score(sc: Scoring, label: str, name: str, cls, settings: dict, subsets: Sequence[str]) -> None:
    model = settings.get("model") or f"clip:{sc.suite.models.clip}"
    key = "clip_score" if label == name else f"clip_score:{label}"
    for ck in sc.ckpts:
        for subset in subsets:
            todo = [r for r in sc.usable(ck.label, subset) if r.get(key) is None]
            if not todo:
                continue
            scores = _clip_values(sc, cls, model, settings, [sc.path(r) for r in todo], [r["prompt"] for r in todo])
            for r, s in zip(todo, scores):
                r[key] = s
    per_image_rows(sc, label, name, key, subsets, hib=True)


# --- dispatch --------------------------------------------------------------------------------

def kind_of(name: str, cls) -> str:
    """'set', 'clip', 'artifact' or 'cluster': how the runner feeds a registry entry."""
    from harness.metrics.fid import FeatureSetMetric

    if isinstance(cls, type) and issubclass(cls, FeatureSetMetric):
        return "set"
    cname = getattr(cls, "__name__", "").lower()
    for kind, marks in (("clip", ("clipscore", "clip_score")), ("artifact", ("artifact",)),
                        ("cluster", ("cluster",))):
        if any(m in cname or m in name for m in marks):
            return kind
    raise ConfigError(f"metric {name!r} ({cname}): harness eval does not know how to feed it "
                      "(supported: set-vs-set feature metrics, CLIP score, artifact score, cluster KL)")


def needed_model(suite: Suite, label: str, cls) -> str | None:
    """The suite.models key a metric needs and that is not given, or None."""
    kind = kind_of(suite.metric_name(label), cls)
    settings = suite.metrics[label].settings
    if kind == "artifact" and not (settings.get("estimator") or suite.models.estimator):
        return "estimator"
    if kind == "cluster" and not (settings.get("detector") or suite.models.detector):
        return "detector"
    return None


def compute(sc: Scoring, label: str, name: str, cls, settings: dict, subsets: Sequence[str], *,
            optional: bool = False) -> None:
    missing = needed_model(sc.suite, label, cls)
    if missing:
        if not optional:
            raise ConfigError(f"metric {label!r} needs models.{missing}; pass --set models.{missing}=PATH")
        sc.notes.append(f"{label}: skipped (optional, and no models.{missing} was given)")
        return
    kind = kind_of(name, cls)
    log.info("scoring %s (%s)", label, name)
    if kind == "set":
        set_metric(sc, label, name, cls, settings, subsets)
    elif kind == "clip":
        clip_score(sc, label, name, cls, settings, subsets)
    elif kind == "artifact":
        artifact_score(sc, label, name, cls, settings, subsets)
    else:
        cluster_kl(sc, label, name, cls, settings, subsets)


# --- metric surfaces over grids ------------------------------------------------------------------

def _clip_cells(sc: Scoring, images: list[Path], prompts: list[str]) -> list[float]:
    from harness.metrics.clip_score import CLIPScore

    return _clip_values(sc, CLIPScore, f"clip:{sc.suite.models.clip}", {}, images, prompts)


def surfaces(sc: Scoring, grids: list[tuple[str, str, dict, Path]]) -> list[dict]:
    """Per-cell mean CLIP score (and artifact score when an estimator is given) over a grid's x and y
    axes (first z value), per checkpoint: does the fine-tune move the best CFG or step count?"""
    by_name: dict[str, dict] = {}
    for name, label, data, folder in grids:
        ax, ay = data["axes"].get("x"), data["axes"].get("y")
        if not ax or not ay:
            continue
        cells = [c for c in data["cells"] if c["z"] == 0]
        files = [(c["y"], c["x"], folder / im["file"], c["params"]["prompt"]) for c in cells for im in c["images"]]
        s = by_name.setdefault(name, {"grid": name, "x_axis": ax["name"], "y_axis": ay["name"],
                                      "x_values": ax["labels"], "y_values": ay["labels"],
                                      "clip_score": {}, "artifact_score": {}})
        shape = (len(ay["labels"]), len(ax["labels"]))
        for key, fn in (("clip_score", _clip_cells), ("artifact_score", _artifact_cells)):
            vals = fn(sc, [f[2] for f in files], [f[3] for f in files])
            if vals is None:
                continue
            grid = np.full(shape, np.nan)
            acc: dict[tuple[int, int], list[float]] = {}
            for (y, x, _, _), v in zip(files, vals):
                acc.setdefault((y, x), []).append(v)
            for (y, x), v in acc.items():
                grid[y, x] = float(np.nanmean(v))
            s[key][label] = [[_f(v) for v in r] for r in grid]
    return list(by_name.values())


# --- artifact score (harness.estimator) ---------------------------------------------------------

def _estimator_path(sc: Scoring, settings: dict | None = None) -> str | None:
    return (settings or {}).get("estimator") or sc.suite.models.estimator


def _artifact_metric(sc: Scoring, cls, settings: dict):
    """The artifact metric (its estimator and VAE load once per run); reset before each set."""
    from harness.estimator.score import ArtifactEstimator

    path = _estimator_path(sc, settings)
    key = ("artifact", path, settings.get("vae_source"))
    if key not in sc._extractors:
        est = ArtifactEstimator.load(path, vae_source=settings.get("vae_source"), device=sc.device)
        sc._extractors[key] = cls(est, device=sc.device)
    m = sc._extractors[key]
    m.reset()
    return m


def _image_batch(paths: Sequence[Path]):
    import torch

    from harness.metrics.images import load_image

    return torch.stack([torch.from_numpy(np.array(load_image(p).convert("RGB"))).permute(2, 0, 1) for p in paths])


def _artifact_values(sc: Scoring, cls, settings: dict, images: Sequence[Path]) -> list[float]:
    m = _artifact_metric(sc, cls, settings)
    for i in range(0, len(images), 16):
        m.update(_image_batch(images[i:i + 16]))
    return [float(v) for v in m.per_image().cpu().numpy()]


def _artifact_cells(sc: Scoring, images: list[Path], prompts: list[str]) -> list[float] | None:
    label = next((lab for lab in sc.suite.metrics if "artifact" in sc.suite.metric_name(lab)), None)
    if label is None or not _estimator_path(sc, dict(sc.suite.metrics[label].settings)):
        return None
    from harness.eval.suite import metric_class

    settings = dict(sc.suite.metrics[label].settings)
    return _artifact_values(sc, metric_class(sc.suite.metric_name(label)), settings, images)


def artifact_score(sc: Scoring, label: str, name: str, cls, settings: dict, subsets: Sequence[str]) -> None:
    """Per-image predicted artifact rating (lower is better), and heatmaps for the worst images."""
    key = "artifact_score" if label == name else f"artifact_score:{label}"
    n_maps = int(settings.pop("heatmaps", 8))
    for ck in sc.ckpts:
        for subset in subsets:
            todo = [r for r in sc.usable(ck.label, subset) if r.get(key) is None]
            for r, v in zip(todo, _artifact_values(sc, cls, settings, [sc.path(r) for r in todo]) if todo else []):
                r[key] = v
            worst = sorted((r for r in sc.usable(ck.label, subset) if r.get(key) is not None),
                           key=lambda r: -r[key])[:n_maps]
            for r in worst:
                _heatmap(sc, cls, settings, r)
    per_image_rows(sc, label, name, key, subsets, hib=False)


def _heatmap(sc: Scoring, cls, settings: dict, r: dict) -> None:
    """Gradient saliency of the estimator on the image, blended in red (harness.estimator.saliency)."""
    from PIL import Image

    from harness.estimator.saliency import artifact_map, overlay

    out = sc.run_dir / layout.HEATMAPS / r["checkpoint"] / r["subset"] / f"{r['index']:05d}_s{r['seed']}.png"
    if not out.is_file():
        est = _artifact_metric(sc, cls, settings)._estimator
        img = _image_batch([sc.path(r)])[0]
        heat = artifact_map(est, img, method=settings.get("heatmap_method", "gradient"))
        from harness.io import atomic_write

        blended = Image.fromarray(overlay(img.permute(1, 2, 0).numpy(), heat))
        atomic_write(out, lambda f: blended.save(f, format="PNG"))
    r["heatmap"] = layout.rel(sc.run_dir, out)
