"""The set-level metrics of :mod:`harness.eval.scoring`, which compare whole sets of images: set-vs-set
(FID, KID, CMMD) against the reference images, with a permutation null for the difference, and the
detector-embedding cluster KL between the reference, the base and each candidate.

A set metric uses its own extractor (FID: Inception, fid_clip: CLIP ViT-B/32, CMMD: CLIP ViT-L/14@336,
...) unless the suite sets ``settings.extractor`` (``models.clip`` = the suite's CLIP); each row names
the extractor it used (``extractor``) and the reference count (``n_ref``) beside ``n``."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import numpy as np

from harness.errors import ConfigError, HarnessError
from harness.eval.score_rows import Scoring, row, set_diff
from harness.eval.suite import SUITE_CLIP
from harness.eval.verdict import paired_set_permutation
from harness.metrics.features import file_features

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


def _metric_extractor(sc: Scoring, cls, settings: dict):
    """The extractor the metric computes on (popping ``extractor`` from ``settings``), in the variant the
    metric's reference uses; a suite's ``crop`` / ``resize`` / ``input_size`` settings override it."""
    spec = settings.pop("extractor", None)
    spec = f"clip:{sc.suite.models.clip}" if spec == SUITE_CLIP else spec or cls.default_extractor
    base = sc.extractor(spec) if isinstance(spec, str) else spec
    return cls.prepare_extractor(base, device=sc.device, **{k: settings.get(k) for k in ("crop", "resize",
                                                                                         "input_size")})


def set_metric(sc: Scoring, label: str, name: str, cls, settings: dict, subsets: Sequence[str]) -> None:
    if not sc.reference:
        raise ConfigError(f"metric {label!r} ({name}) compares with reference images: give the suite a "
                          "'reference' (a folder, or heldout: true with --data)")
    ci = sc.suite.ci
    settings = dict(settings)
    n_boot = int(settings.pop("n_boot", min(ci.n_boot, 100)))
    ext = _metric_extractor(sc, cls, settings)
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
            # provenance of the row: what the features are, and the N the value belongs to
            r.update(extractor=ext.identity, n_ref=len(ref),
                     **{k: res[k] for k in ("kid_std", "kid_std_method", "subset_size") if k in res})
            if ck.role == "candidate" and res.get("value") is not None:
                _paired_diff(sc, r, m, ref, feats[sc.base.label], feats[ck.label], x.shape[1], n_boot)
            sc.rows.append(r)
        _too_few(sc, label, name, cls, ext, ref, subset, feats)


def _paired_diff(sc: Scoring, r: dict, m, ref, base_f: dict, cand_f: dict, dim: int, n_boot: int) -> None:
    """The candidate - base difference and its permutation interval, on the images usable in both."""
    ci = sc.suite.ci
    pairs = sorted(set(base_f) & set(cand_f))
    b_ = np.stack([base_f[k] for k in pairs]) if pairs else np.zeros((0, dim))
    c_ = np.stack([cand_f[k] for k in pairs]) if pairs else b_
    set_diff(r, paired_set_permutation(_statistic(m), _canon(ref), b_.astype(np.float64), c_.astype(np.float64),
                                       n_perm=n_boot, alpha=ci.alpha, seed=ci.seed), ci.margin)


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
    if kid is None:  # KID on the same features; below 1000 images it warns and takes its std from the bootstrap
        set_metric(sc, f"{label}:kid", "kid", KID, {"extractor": ext}, [subset])


# --- cluster KL (harness.metrics) ----------------------------------------------------------------

def cluster_kl(sc: Scoring, label: str, name: str, cls, settings: dict, subsets: Sequence[str]) -> None:
    """OD = the reference images, BM = the base model's, TM = each candidate's. The base row holds
    KL(OD||BM), a candidate's row KL(OD||TM); the per-class breakdown goes to ``breakdowns``."""
    from harness.metrics.detector import YoloDetector
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
        bm_recs = sc.usable(sc.base.label, subset)
        bm = [load_image(sc.path(r)) for r in bm_recs]
        base_row = None
        for ck in sc.ckpts[1:]:
            m = cls(detector, embedder, seed=ci.seed, **settings)
            m.update(od, set="od")
            tm_recs = sc.usable(ck.label, subset)
            # an image's pair is the other model's image of the same prompt and seed (the verdict's unit)
            ids = {k: i for i, k in enumerate(sorted({(r["index"], r["seed"]) for r in bm_recs + tm_recs}))}
            m.update(bm, set="bm", pairs=[ids[(r["index"], r["seed"])] for r in bm_recs])
            m.update([load_image(sc.path(r)) for r in tm_recs], set="tm",
                     pairs=[ids[(r["index"], r["seed"])] for r in tm_recs])
            res = m.compute_ci(n_boot=ci.n_boot, alpha=ci.alpha, seed=ci.seed)
            cis = res.get("ci", {})
            note = "; ".join(res.get("warnings") or []) or None
            if base_row is None:
                lo, hi = cis.get("kl_od_bm", [None, None])
                base_row = row(sc.base, label, name, subset, res.get("kl_od_bm"), lo, hi, len(bm), False, note)
                base_row.update(extractor=res.get("embedder"), n_ref=len(od))
                sc.rows.append(base_row)
            lo, hi = cis.get("kl_od_tm", [None, None])
            extra = ", ".join(f"{k}={res[k]:.3g}" for k in ("kl_bm_tm", "js_od_tm", "class_kl_od_tm")
                              if isinstance(res.get(k), (int, float)))
            r = row(ck, label, name, subset, res.get("value"), lo, hi, res.get("n_b"), False,
                    "; ".join(x for x in (extra, note) if x) or None)
            r.update(extractor=res.get("embedder"), n_ref=len(od))
            pd = res.get("paired_diff")
            if r["value"] is not None and base_row["value"] is not None:
                # the permutation interval of KL(OD||TM) - KL(OD||BM); without >= 2 pairs, no verdict
                d = (pd["diff"], pd["ci_low"], pd["ci_high"]) if pd else (r["value"] - base_row["value"], math.nan,
                                                                          math.nan)
                set_diff(r, d, ci.margin)
            sc.rows.append(r)
            sc.breakdowns.setdefault(label, {})[f"{ck.label} ({subset})"] = res.get("per_class", [])
