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
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.errors import ConfigError, HarnessError
from harness.eval import layout
from harness.eval.plan import Checkpoint, Item
from harness.eval.suite import Suite
from harness.eval.verdict import paired_bootstrap_diff, paired_set_bootstrap, verdict
from harness.metrics.features import file_features

log = logging.getLogger(__name__)


@dataclass
class Scoring:
    """Inputs shared by every metric, and what they produce."""

    run_dir: Path
    suite: Suite
    ckpts: list[Checkpoint]
    items: list[Item]
    per_image: list[dict]  # one record per checkpoint x item, in checkpoint-major item order
    reference: list[Path]
    cache_dir: Path
    device: str = "cpu"
    progress: bool = False
    allow_pickle: bool = False
    rows: list[dict] = field(default_factory=list)
    breakdowns: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _extractors: dict = field(default_factory=dict)

    @property
    def base(self) -> Checkpoint:
        return self.ckpts[0]

    def records(self, label: str, subset: str) -> list[dict]:
        return [r for r in self.per_image if r["checkpoint"] == label and r["subset"] == subset]

    def usable(self, label: str, subset: str) -> list[dict]:
        """Records whose image exists and whose latents were finite (NaN/Inf samples are marked, not scored)."""
        return [r for r in self.records(label, subset) if not r["nonfinite"] and r.get("image")]

    def path(self, r: dict) -> Path:
        return layout.resolve(self.run_dir, r["image"])

    def extractor(self, spec: str):
        if spec not in self._extractors:
            from harness.metrics.features import get_extractor

            self._extractors[spec] = get_extractor(spec, device=self.device)
        return self._extractors[spec]


def row(ckpt: Checkpoint, label: str, name: str, subset: str, value, ci_low, ci_high, n, hib, note=None) -> dict:
    return {"checkpoint": ckpt.label, "role": ckpt.role, "step": ckpt.step, "metric": label, "metric_name": name,
            "subset": subset, "value": _f(value), "ci_low": _f(ci_low), "ci_high": _f(ci_high), "n": n,
            "higher_is_better": hib, "diff": None, "diff_ci_low": None, "diff_ci_high": None, "verdict": None,
            "note": note}


def _f(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def set_diff(r: dict, diff: tuple[float, float, float], margin: float) -> None:
    d, lo, hi = diff
    r.update(diff=_f(d), diff_ci_low=_f(lo), diff_ci_high=_f(hi),
             verdict=verdict(_f(lo), _f(hi), r["higher_is_better"], margin))


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
                set_diff(r, paired_bootstrap_diff(base_vals, vals, n_boot=ci.n_boot, alpha=ci.alpha, seed=ci.seed),
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


# --- set-vs-set metrics -----------------------------------------------------------------------

def _statistic(metric):
    """The metric's set statistic; KID's bootstrap uses fewer subsets per replicate (as its own CI does)."""
    if "subsets" in inspect.signature(metric.statistic).parameters:
        return lambda a, b: metric.statistic(a, b, subsets=10)
    return metric.statistic


def _canon(x: np.ndarray) -> np.ndarray:
    """float64 rows in an order fixed by their values (subset draws then do not depend on file order)."""
    from harness.metrics.base import canonical_order

    x = np.asarray(x, dtype=np.float64)
    return x[canonical_order(x)]


def set_metric(sc: Scoring, label: str, name: str, cls, settings: dict, subsets: Sequence[str]) -> None:
    if not sc.reference:
        raise ConfigError(f"metric {label!r} ({name}) compares with reference images: give the suite a "
                          "'reference' (a folder, or heldout: true with --data)")
    ci = sc.suite.ci
    settings = dict(settings)
    n_boot = int(settings.pop("n_boot", min(ci.n_boot, 100)))
    spec = settings.pop("extractor", None) or f"clip:{sc.suite.models.clip}"
    ext = sc.extractor(spec) if isinstance(spec, str) else spec
    ref = file_features(sc.reference, ext, sc.cache_dir, desc="reference features", progress=sc.progress)
    for subset in subsets:
        feats: dict[str, dict[tuple[int, int], np.ndarray]] = {}
        for ck in sc.ckpts:
            recs = sc.usable(ck.label, subset)
            x = file_features([sc.path(r) for r in recs], ext, sc.cache_dir, desc=f"features {ck.label}/{subset}",
                              progress=sc.progress)
            feats[ck.label] = {(r["index"], r["seed"]): f for r, f in zip(recs, x)}
            m = cls(ext, **settings)
            note = None
            try:
                m.update_features(ref, real=True)
                m.update_features(x, real=False)
                res = m.compute_ci(n_boot=n_boot, alpha=ci.alpha, seed=ci.seed)
            except HarnessError as e:
                res, note = {"value": None, "ci_low": None, "ci_high": None}, str(e)
            note = "; ".join([*(res.get("warnings") or []), *([note] if note else [])]) or None
            r = row(ck, label, name, subset, res.get("value"), res.get("ci_low"), res.get("ci_high"), len(x),
                    bool(getattr(cls, "higher_is_better", False)), note)
            if ck.role == "candidate" and res.get("value") is not None:
                base_f = feats[sc.base.label]
                pairs = sorted(set(base_f) & set(feats[ck.label]))  # images usable in both
                b_ = np.stack([base_f[k] for k in pairs]) if pairs else np.zeros((0, x.shape[1]))
                c_ = np.stack([feats[ck.label][k] for k in pairs]) if pairs else b_
                set_diff(r, paired_set_bootstrap(_statistic(m), _canon(ref), b_.astype(np.float64),
                                                 c_.astype(np.float64), n_boot=n_boot, alpha=ci.alpha, seed=ci.seed),
                         ci.margin)
            sc.rows.append(r)
        _too_few(sc, label, name, cls, ext, ref, subset, feats)


def _too_few(sc: Scoring, label, name, cls, ext, ref, subset, feats) -> None:
    """FID below the feature dimension is biased and unstable: say so, and point to KID on the same
    features (added here unless the suite already computes it)."""
    from harness.metrics.fid import FID, KID

    if not issubclass(cls, FID):
        return
    n = min(len(ref), *(len(v) for v in feats.values()))
    if n >= ext.dim:
        return
    kid = next((lab for lab in sc.suite.metrics if sc.suite.metric_name(lab) == "kid"
                and subset in sc.suite.subsets_of(lab)), None)
    sc.notes.append(f"{label} ({subset}): {n} images per set with {ext.dim}-dimensional features; FID needs more "
                    f"images than feature dimensions (>= 2048 for Inception): read KID ({kid or label + ':kid'}) "
                    "instead")
    if kid is None:
        set_metric(sc, f"{label}:kid", "kid", KID, {"extractor": ext, "subset_size": max(2, min(n, 1000))}, [subset])


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


# --- cluster KL (harness.metrics) ----------------------------------------------------------------

def cluster_kl(sc: Scoring, label: str, name: str, cls, settings: dict, subsets: Sequence[str]) -> None:
    """OD = the reference images, BM = the base model's, TM = each candidate's. The base row holds
    KL(OD||BM), a candidate's row KL(OD||TM); the per-class breakdown goes to ``breakdowns``."""
    from harness.eval.verdict import diff_from_intervals
    from harness.metrics.cluster_kl import YoloDetector
    from harness.metrics.images import load_image

    if not sc.reference:
        raise ConfigError(f"metric {label!r} (cluster KL) needs reference images (the original data): give the "
                          "suite a 'reference'")
    settings = dict(settings)
    ci = sc.suite.ci
    det_key = ("detector", settings.get("detector") or sc.suite.models.detector)
    if det_key not in sc._extractors:
        sc._extractors[det_key] = YoloDetector(det_key[1], conf=float(settings.get("conf", 0.25)),
                                               imgsz=int(settings.pop("imgsz", 640)), device=sc.device,
                                               allow_pickle=sc.allow_pickle)
    settings.pop("detector", None)
    detector = sc._extractors[det_key]
    embedder = settings.pop("embedder", None) or f"clip:{sc.suite.models.clip}"
    # "detector": ClusterKL pools the detector's own features per box; anything else is a feature extractor.
    embedder = embedder if embedder == "detector" else sc.extractor(embedder)
    od = [load_image(p) for p in sc.reference]
    for subset in subsets:
        bm = [load_image(sc.path(r)) for r in sc.usable(sc.base.label, subset)]
        base_row = None
        for ck in sc.ckpts[1:]:
            m = cls(detector, embedder, seed=ci.seed, **settings)
            m.update(od, set="od")
            m.update(bm, set="bm")
            m.update([load_image(sc.path(r)) for r in sc.usable(ck.label, subset)], set="tm")
            res = m.compute_ci(n_boot=ci.n_boot, alpha=ci.alpha, seed=ci.seed)
            cis = res.get("ci", {})
            note = "; ".join(res.get("warnings") or []) or None
            if base_row is None:
                lo, hi = cis.get("kl_od_bm", [None, None])
                base_row = row(sc.base, label, name, subset, res.get("kl_od_bm"), lo, hi, len(bm), False, note)
                sc.rows.append(base_row)
            lo, hi = cis.get("kl_od_tm", [None, None])
            extra = ", ".join(f"{k}={res[k]:.3g}" for k in ("kl_bm_tm", "js_od_tm", "class_kl_od_tm")
                              if isinstance(res.get(k), (int, float)))
            r = row(ck, label, name, subset, res.get("value"), lo, hi, res.get("n_b"), False,
                    "; ".join(x for x in (extra, note) if x) or None)
            if r["value"] is not None and base_row["value"] is not None:
                set_diff(r, diff_from_intervals(base_row["value"], _nan(base_row["ci_low"]), _nan(base_row["ci_high"]),
                                                r["value"], _nan(r["ci_low"]), _nan(r["ci_high"])), ci.margin)
            sc.rows.append(r)
            sc.breakdowns.setdefault(label, {})[f"{ck.label} ({subset})"] = res.get("per_class", [])


def _nan(v) -> float:
    return math.nan if v is None else float(v)
