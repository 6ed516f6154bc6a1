"""Detector-embedding-cluster KL: which objects did a fine-tune change, and how much.

Idea (``shared/seeds/004``): detect objects in the original dataset (OD), base-model (BM) and
trained-model (TM) images; crop every detection above ``conf``; embed the crops (CLIP image encoder
by default, any extractor, or ``"detector"``: the detector's own neck features pooled in each box);
per detected class, fit PCA on the pooled crops of that class and
cluster them with k-means (k from the class's crop count); then compare the sets' distributions over
(class, cluster) cells: KL(OD||TM), KL(BM||TM), Jensen-Shannon, and the class-frequency divergence
alone, each with additive smoothing so an empty cell stays finite. Natural logs (nats).

The detector is pluggable: any callable ``list[PIL.Image] -> list[(boxes_xyxy, classes, scores)]``;
:class:`YoloDetector` wraps ultralytics. Deterministic for a seed (crops are put in a canonical order
before PCA / k-means, so one process and several give the same clusters).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from PIL import Image
from torchmetrics import Metric

from harness.errors import HarnessError
from harness.metrics.base import canonical_order, cat_state, record
from harness.metrics.bootstrap import RECENTRED, permutation_halfwidth, recentred_interval
from harness.metrics.detector import DetectorFeatures, as_detections, crop_boxes
from harness.metrics.features import get_extractor
from harness.metrics.images import to_batch

log = logging.getLogger(__name__)

SETS = ("od", "bm", "tm")
PAIRS = (("od", "tm"), ("bm", "tm"), ("od", "bm"))


# ---------------------------------------------------------------------------------------------
# pure math


def smooth(counts, alpha: float = 0.5) -> np.ndarray:
    """Additive (Lidstone) smoothing: (c + alpha) / (N + alpha K)."""
    c = np.asarray(counts, dtype=np.float64)
    if alpha < 0 or (alpha == 0 and c.sum() == 0):
        raise ValueError(f"smooth: need alpha > 0 or some counts, got alpha={alpha}, total={c.sum()}")
    return (c + alpha) / (c.sum() + alpha * c.size)


def kl(p, q) -> float:
    """KL(p || q) = sum p log(p / q) in nats; inputs are normalised; 0 log 0 = 0, p > 0 = q gives inf."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"kl: shapes differ: {p.shape} vs {q.shape}")
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    if np.any(q[m] == 0):
        return math.inf
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def js(p, q) -> float:
    """Jensen-Shannon divergence in nats (symmetric, at most ln 2)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def clusters_for(n: int, k_max: int = 20) -> int:
    """k for a class with n pooled crops: sqrt(n / 2) (a common rule of thumb), within [1, k_max]."""
    return int(max(1, min(k_max, round(math.sqrt(n / 2)), n)))


# ---------------------------------------------------------------------------------------------
# the metric


def _rgb_arrays(images) -> list[np.ndarray]:
    """HxWx3 uint8 arrays at native size (each image keeps its own size for cropping)."""
    if isinstance(images, torch.Tensor):
        return list(to_batch(images, None).permute(0, 2, 3, 1).numpy())
    return [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image)
            else to_batch([im], None)[0].permute(1, 2, 0).numpy() for im in images]


class ClusterKL(Metric):
    """``update(images, set='od'|'bm'|'tm')``; ``compute()`` -> result dict (see module docstring)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, detector, embedder="clip:ViT-B-32:openai", *, conf: float = 0.25, pca_dim: int = 32,
                 k_max: int = 20, alpha: float = 0.5, min_crop: int = 4, seed: int = 0,
                 class_names: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.__dict__["detector"] = detector
        self.__dict__["embedder"] = (DetectorFeatures(detector) if isinstance(embedder, str) and embedder == "detector"
                                     else get_extractor(embedder))
        self.conf, self.pca_dim, self.k_max, self.alpha = conf, pca_dim, k_max, alpha
        self.min_crop, self.seed = min_crop, seed
        self.class_names = dict(class_names or getattr(detector, "names", {}) or {})
        self.add_state("emb", default=[], dist_reduce_fx="cat")
        self.add_state("cls", default=[], dist_reduce_fx="cat")
        self.add_state("set_id", default=[], dist_reduce_fx="cat")
        self.add_state("crop_pair", default=[], dist_reduce_fx="cat")  # pair id of each crop's image
        self.add_state("image_pair", default=[], dist_reduce_fx="cat")  # [set id, pair id] of every image
        self.add_state("n_images", torch.zeros(len(SETS), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_boxes", torch.zeros(len(SETS), dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, images, set: str, pairs=None) -> None:  # type: ignore[override]  # noqa: A002
        """``pairs``: one integer per image naming what it shares with an image of the other model
        (its prompt and seed), for :meth:`paired_diff`; default: its position in this set."""
        if set not in SETS:
            raise HarnessError(f"cluster_kl: set must be one of {', '.join(SETS)}, got {set!r}")
        sid = SETS.index(set)
        arrays = _rgb_arrays(images)
        start = int(self.n_images[sid])
        pairs = list(range(start, start + len(arrays))) if pairs is None else [int(x) for x in pairs]
        if len(pairs) != len(arrays):
            raise HarnessError(f"cluster_kl: {len(pairs)} pair ids for {len(arrays)} images")
        self.image_pair.append(torch.tensor([[sid, x] for x in pairs], dtype=torch.long).reshape(-1, 2))
        dets = self.detector([Image.fromarray(np.ascontiguousarray(a)) for a in arrays])
        if len(dets) != len(arrays):
            raise HarnessError(f"cluster_kl: the detector returned {len(dets)} results for {len(arrays)} images")
        crops, classes, kept_boxes, crop_pair = [], [], [], []
        for a, d, pair in zip(arrays, dets, pairs):
            boxes, cls, scores = as_detections(d)
            keep = scores >= self.conf
            mine = []
            for c, k, box in zip(crop_boxes(a, boxes[keep], self.min_crop), cls[keep], boxes[keep]):
                if c is not None:
                    crops.append(np.ascontiguousarray(c))
                    classes.append(int(k))
                    crop_pair.append(pair)
                    mine.append(box)
            kept_boxes.append(np.asarray(mine, dtype=np.float64).reshape(-1, 4))
        self.n_images[sid] += len(arrays)
        self.n_boxes[sid] += len(crops)
        if crops:
            if isinstance(self.embedder, DetectorFeatures):
                pils = [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]
                e = torch.cat(self.embedder.detector.box_features(pils, kept_boxes)).double()
            else:
                e = self.embedder.batch(crops).double()
            self.emb.append(e)
            self.cls.append(torch.tensor(classes, dtype=torch.long))
            self.set_id.append(torch.full((len(crops),), sid, dtype=torch.long))
            self.crop_pair.append(torch.tensor(crop_pair, dtype=torch.long))

    def _crops(self):
        emb = cat_state(self.emb).cpu().numpy()
        cls = cat_state(self.cls).cpu().numpy().astype(np.int64).reshape(-1)
        sid = cat_state(self.set_id).cpu().numpy().astype(np.int64).reshape(-1)
        pair = cat_state(self.crop_pair).cpu().numpy().astype(np.int64).reshape(-1)
        if len(emb) == 0:
            return emb, cls, sid, pair
        key = np.concatenate([sid[:, None], cls[:, None], emb], axis=1)
        order = canonical_order(key)
        return emb[order], cls[order], sid[order], pair[order]

    def _cells(self, emb, cls) -> tuple[np.ndarray, list[tuple[int, int]], dict]:
        """Cluster each class; return the cell index of every crop, the cell list and per-class k."""
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        cell = np.zeros(len(emb), dtype=np.int64)
        cells: list[tuple[int, int]] = []
        ks = {}
        for c in np.unique(cls):
            idx = np.flatnonzero(cls == c)
            x = emb[idx]
            k = clusters_for(len(idx), self.k_max)
            dim = min(self.pca_dim, len(idx) - 1, x.shape[1])
            # A class whose crops all embed alike has no direction to keep (PCA would divide by a zero
            # variance and warn); it is one cluster either way.
            if dim >= 1 and dim < x.shape[1] and np.ptp(x, axis=0).any():
                x = PCA(n_components=dim, svd_solver="full", random_state=self.seed).fit_transform(x)
            if k > 1 and len(np.unique(x, axis=0)) >= k:
                labels = KMeans(n_clusters=k, n_init=10, random_state=self.seed).fit_predict(x)
            else:
                k, labels = 1, np.zeros(len(idx), dtype=np.int64)
            cell[idx] = len(cells) + labels
            cells += [(int(c), j) for j in range(k)]
            ks[int(c)] = k
        return cell, cells, ks

    def _name(self, c: int) -> str:
        return str(self.class_names.get(c, c))

    def _divergences(self, counts: dict[str, np.ndarray], cells) -> dict:
        """All divergences from per-set cell counts (used for the value and each bootstrap replicate)."""
        cell_cls = np.array([c for c, _ in cells])
        classes = np.unique(cell_cls)
        out = {}
        for a, b in PAIRS:
            if a not in counts or b not in counts:
                continue
            p, q = smooth(counts[a], self.alpha), smooth(counts[b], self.alpha)
            ca = np.array([counts[a][cell_cls == c].sum() for c in classes])
            cb = np.array([counts[b][cell_cls == c].sum() for c in classes])
            out[f"kl_{a}_{b}"] = kl(p, q)
            out[f"js_{a}_{b}"] = js(p, q)
            out[f"class_kl_{a}_{b}"] = kl(smooth(ca, self.alpha), smooth(cb, self.alpha))
        return out

    def _per_class(self, counts, cells, ks) -> list[dict]:
        cell_cls = np.array([c for c, _ in cells])
        rows = []
        probs = {s: smooth(v, self.alpha) for s, v in counts.items()}
        for c in np.unique(cell_cls):
            m = cell_cls == c
            row = {"class": int(c), "name": self._name(int(c)), "k": ks[int(c)],
                   **{f"n_{s}": int(v[m].sum()) for s, v in counts.items()}}
            for a, b in (("od", "tm"), ("bm", "tm")):
                if a in counts and b in counts:
                    pa, pb = probs[a][m], probs[b][m]
                    row[f"kl_{a}_{b}"] = kl(smooth(counts[a][m], self.alpha), smooth(counts[b][m], self.alpha))
                    row[f"contribution_{a}_{b}"] = float(np.sum(pa * np.log(pa / pb)))
            rows.append(row)
        key = "contribution_od_tm" if rows and "contribution_od_tm" in rows[0] else "class"
        return sorted(rows, key=lambda r: -r.get(key, 0) if key != "class" else r["class"])

    def _analyse(self):
        emb, cls, sid, pair = self._crops()
        present = [s for i, s in enumerate(SETS) if int(self.n_images[i]) > 0]
        empty = [s for i, s in enumerate(SETS) if int(self.n_images[i]) > 0 and int(self.n_boxes[i]) == 0]
        warnings = [f"no detections above conf={self.conf} in {s.upper()} ({int(self.n_images[SETS.index(s)])} "
                    "images): divergences involving it are undefined (null)" for s in empty]
        for w in warnings:
            log.warning("cluster_kl: %s", w)
        usable = [s for s in present if s not in empty]
        if len(emb) == 0 or len(usable) < 2:
            return None, {}, [], {}, warnings, None
        cell, cells, ks = self._cells(emb, cls)
        counts = {s: np.bincount(cell[sid == SETS.index(s)], minlength=len(cells)).astype(np.float64)
                  for s in usable}
        return counts, self._divergences(counts, cells), cells, ks, warnings, (cell, sid, pair)

    def compute(self) -> dict:
        counts, div, cells, ks, warnings, _crops = self._analyse()
        names = [f"{k}_{a}_{b}" for a, b in PAIRS for k in ("kl", "js", "class_kl")]
        out = {n: div.get(n) for n in names}
        out.update({
            "value": div.get("kl_od_tm"),
            "per_class": self._per_class(counts, cells, ks) if counts else [],
            "n_images": {s: int(self.n_images[i]) for i, s in enumerate(SETS)},
            "n_crops": {s: int(self.n_boxes[i]) for i, s in enumerate(SETS)},
            "n_cells": len(cells), "warnings": warnings,
        })
        return out

    def paired_diff(self, counts: dict, cells, crops, *, n_perm: int = 1000, alpha: float = 0.05,
                    seed: int = 0) -> dict | None:
        """KL(OD||TM) - KL(OD||BM) with a permutation-null interval (the verdict's statistic).

        BM and TM images are paired by the ids given to :meth:`update` (same prompt and seed). If the
        two models make the same distribution, swapping a pair's two images changes nothing in
        distribution: each replicate swaps a fair coin's share of the pairs (all their crops change
        set; the clusters stay fixed) and recomputes the difference. The interval is the difference
        ± the test's critical value: it contains the difference, and excludes 0 exactly when the
        permutation test rejects at ``alpha``. None without both BM and TM crops or with < 2 pairs."""
        if crops is None or not {"od", "bm", "tm"} <= set(counts):
            return None
        cell, sid, pair = crops
        ip = cat_state(self.image_pair).cpu().numpy().astype(np.int64).reshape(-1, 2)
        bm, tm = SETS.index("bm"), SETS.index("tm")
        shared = np.intersect1d(ip[ip[:, 0] == bm, 1], ip[ip[:, 0] == tm, 1])
        if len(shared) < 2:
            return None
        od = np.bincount(cell[sid == SETS.index("od")], minlength=len(cells)).astype(np.float64)
        movable = np.isin(sid, (bm, tm)) & np.isin(pair, shared)

        p_od = smooth(od, self.alpha)  # the reference side never moves

        def diff(s: np.ndarray) -> float:
            b = np.bincount(cell[s == bm], minlength=len(cells)).astype(np.float64)
            t = np.bincount(cell[s == tm], minlength=len(cells)).astype(np.float64)
            return kl(p_od, smooth(t, self.alpha)) - kl(p_od, smooth(b, self.alpha))

        d = diff(sid)
        rng = np.random.default_rng(seed)
        null = []
        for _ in range(n_perm):
            flip = np.isin(pair, shared[rng.random(len(shared)) < 0.5]) & movable
            null.append(diff(np.where(flip, bm + tm - sid, sid)))
        q = permutation_halfwidth(d, null, alpha)
        return {"diff": d, "ci_low": d - q, "ci_high": d + q, "n_pairs": int(len(shared)),
                "n_perm": n_perm, "method": "permutation null: paired BM/TM images swapped, clusters fixed"}

    def compute_ci(self, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
        """Bootstrap over crops within each set (clusters held fixed): multinomial resampling of cell
        counts, recentred on the estimate; plus :meth:`paired_diff` for the verdict."""
        with self.sync_context():
            res = self.compute()
            counts, _div, cells, _ks, _w, crops = self._analyse()
            ci = {}
            if counts:
                rng = np.random.default_rng(seed)
                reps = {}
                for _ in range(n_boot):
                    rc = {s: rng.multinomial(int(v.sum()), v / v.sum()).astype(np.float64) for s, v in counts.items()}
                    for k, v in self._divergences(rc, cells).items():
                        reps.setdefault(k, []).append(v)
                full = self._divergences(counts, cells)
                for k, v in reps.items():  # recentred: a resample of crops always looks further apart
                    lo, hi, _sd = recentred_interval(full[k], v, alpha, lower=0.0)
                    ci[k] = [lo, hi]
            head = ci.get("kl_od_tm", [None, None])
            n = res["n_images"]
            extra = {k: v for k, v in res.items() if k not in ("value", "warnings")}
            extra["paired_diff"] = self.paired_diff(counts or {}, cells, crops, n_perm=n_boot, alpha=alpha, seed=seed)
            extra.update({"ci": ci, "n_boot": n_boot, "alpha": alpha, "conf": self.conf, "smoothing": self.alpha,
                          "pca_dim": self.pca_dim, "k_max": self.k_max, "seed": self.seed,
                          "embedder": self.embedder.identity, "extractor": self.embedder.identity,
                          "detector": getattr(self.detector, "identity", type(self.detector).__name__),
                          "ci_method": f"{RECENTRED}; crops resampled, clusters fixed", "units": "nats"})
            return record("cluster_kl", res["value"], n_a=n["od"], n_b=n["tm"], warnings=res["warnings"],
                          ci={"ci_low": head[0], "ci_high": head[1]}, extra=extra)
