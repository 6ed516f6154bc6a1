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
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchmetrics import Metric

from harness.errors import HarnessError, UnsafeCheckpointError
from harness.metrics.base import canonical_order, cat_state, record
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
# detectors


def as_detections(d) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes, classes, scores = d
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return boxes, np.asarray(classes, dtype=np.int64).reshape(-1), np.asarray(scores, dtype=np.float64).reshape(-1)


class YoloDetector:
    """An ultralytics detector as ``images -> [(boxes, classes, scores)]``.

    ``model``: a ``YOLO`` object, a zoo folder (``model-t.yaml`` + ``model.safetensors``), a ``.yaml``
    (random weights), or a ``.pt`` file (a pickle: needs ``allow_pickle=True``).
    """

    def __init__(self, model, *, conf: float = 0.25, imgsz: int = 640, allow_pickle: bool = False,
                 device: str = "cpu"):
        import os

        os.environ.setdefault("YOLO_OFFLINE", "1")
        self.conf, self.imgsz, self.device = conf, imgsz, device
        self.model, self.identity = self._load(model, allow_pickle)
        self.names = dict(getattr(self.model, "names", {}) or {})

    @staticmethod
    def _load(model, allow_pickle):
        if not isinstance(model, (str, Path)):
            return model, f"yolo:{type(model).__name__}"
        from harness.models.tiny import load_yolo_dir

        p = Path(model)
        if p.is_dir():
            if not (p / "model-t.yaml").is_file():
                raise HarnessError(f"{p}: not a detector folder (expected model-t.yaml + model.safetensors)")
            return load_yolo_dir(p), f"yolo:{p.resolve()}"
        if p.suffix in (".yaml", ".yml"):
            from ultralytics import YOLO

            return YOLO(str(p), task="detect"), f"yolo:{p.name}:random"
        if not allow_pickle:
            raise UnsafeCheckpointError(f"{model}: ultralytics .pt files are pickles that can run code; "
                                        "pass allow_pickle=True (--allow-pickle) if you trust it")
        from ultralytics import YOLO

        try:
            return YOLO(str(model)), f"yolo:{model}"
        except Exception as e:
            raise HarnessError(f"{model}: cannot load the detector ({type(e).__name__}: {e})".split("\n")[0]) from e

    def __call__(self, images: list[Image.Image]):
        results = self.model.predict(images, conf=self.conf, imgsz=self.imgsz, device=self.device, verbose=False)
        out = []
        for r in results:
            b = r.boxes
            out.append((b.xyxy.cpu().numpy(), b.cls.cpu().numpy().astype(int), b.conf.cpu().numpy()))
        return out

    @torch.no_grad()
    def box_features(self, images: list[Image.Image], boxes: list[np.ndarray], batch_size: int = 16) -> list:
        """The detector's own per-box features: its neck's feature maps (what the Detect head reads,
        captured with a forward pre-hook) average-pooled inside each box with ``roi_align`` at every
        level, levels concatenated. Images are letterboxed to ``imgsz`` as predict does; ``boxes`` are
        xyxy in the original image's pixels. Returns one float32 [n_boxes, D] tensor per image."""
        from torchvision.ops import roi_align
        from ultralytics.nn.modules.head import Detect

        net = self.model.model if hasattr(self.model, "predict") else self.model
        head = next((m for m in net.modules() if isinstance(m, Detect)), None)
        if head is None:
            raise HarnessError(f"{self.identity}: no Detect head found; detector features need a YOLO detector")
        param = next(net.parameters())
        captured: list = []
        hook = head.register_forward_pre_hook(lambda _m, args: captured.append([t.float() for t in args[0]]))
        out = []
        try:
            for i in range(0, len(images), batch_size):
                chunk = images[i:i + batch_size]
                x, places = zip(*(letterbox(im, self.imgsz) for im in chunk))
                captured.clear()
                net(torch.stack(x).to(param.device, param.dtype))
                rois = [torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4)) * g + torch.tensor(
                    [px, py, px, py]) for b, (g, px, py) in zip(boxes[i:i + batch_size], places)]
                rois = [r.to(param.device) for r in rois]
                levels = [roi_align(f, rois, output_size=(2, 2), spatial_scale=1.0 / float(st), sampling_ratio=2,
                                    aligned=True).mean(dim=(2, 3)) for f, st in zip(captured[0], head.stride)]
                feats = torch.cat(levels, dim=1).cpu()
                out.extend(feats.split([len(r) for r in rois]))
        finally:
            hook.remove()
        return out


def letterbox(image: Image.Image, size: int, fill: int = 114) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Resize the long side to ``size`` (aspect kept) and centre on a ``size`` square of grey, as
    ultralytics' LetterBox does; returns the [3, size, size] float tensor in [0, 1] and (gain, pad_x, pad_y)."""
    w, h = image.size
    gain = size / max(w, h)
    nw, nh = max(1, round(w * gain)), max(1, round(h * gain))
    px, py = (size - nw) // 2, (size - nh) // 2
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    canvas.paste(image.convert("RGB").resize((nw, nh), Image.BILINEAR), (px, py))
    x = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255).permute(2, 0, 1)
    return x, (nw / w, float(px), float(py))


class DetectorFeatures:
    """``embedder="detector"``: per-box features from the detector itself (see
    :meth:`YoloDetector.box_features`) instead of embedding crops with a separate model."""

    def __init__(self, detector):
        if not hasattr(detector, "box_features"):
            raise HarnessError(f"cluster_kl: embedder='detector' needs a detector with box_features() (such as "
                               f"YoloDetector); got {type(detector).__name__}")
        self.detector = detector
        self.identity = f"detector-features:{getattr(detector, 'identity', type(detector).__name__)}"


def crop_boxes(img: np.ndarray, boxes: np.ndarray, min_size: int) -> list[np.ndarray]:
    """Crops (HxWx3 uint8) inside the image; boxes narrower than ``min_size`` px give None."""
    h, w = img.shape[:2]
    crops = []
    for x0, y0, x1, y1 in boxes:
        a, b = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c, d = min(int(np.ceil(x1)), w), min(int(np.ceil(y1)), h)
        crops.append(img[b:d, a:c] if (c - a) >= min_size and (d - b) >= min_size else None)
    return crops


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
        self.add_state("n_images", torch.zeros(len(SETS), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_boxes", torch.zeros(len(SETS), dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, images, set: str) -> None:  # type: ignore[override]  # noqa: A002
        if set not in SETS:
            raise HarnessError(f"cluster_kl: set must be one of {', '.join(SETS)}, got {set!r}")
        sid = SETS.index(set)
        arrays = _rgb_arrays(images)
        dets = self.detector([Image.fromarray(np.ascontiguousarray(a)) for a in arrays])
        if len(dets) != len(arrays):
            raise HarnessError(f"cluster_kl: the detector returned {len(dets)} results for {len(arrays)} images")
        crops, classes, kept_boxes = [], [], []
        for a, d in zip(arrays, dets):
            boxes, cls, scores = as_detections(d)
            keep = scores >= self.conf
            mine = []
            for c, k, box in zip(crop_boxes(a, boxes[keep], self.min_crop), cls[keep], boxes[keep]):
                if c is not None:
                    crops.append(np.ascontiguousarray(c))
                    classes.append(int(k))
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

    def _crops(self):
        emb = cat_state(self.emb).cpu().numpy()
        cls = cat_state(self.cls).cpu().numpy().astype(np.int64).reshape(-1)
        sid = cat_state(self.set_id).cpu().numpy().astype(np.int64).reshape(-1)
        if len(emb) == 0:
            return emb, cls, sid
        key = np.concatenate([sid[:, None], cls[:, None], emb], axis=1)
        order = canonical_order(key)
        return emb[order], cls[order], sid[order]

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
        emb, cls, sid = self._crops()
        present = [s for i, s in enumerate(SETS) if int(self.n_images[i]) > 0]
        empty = [s for i, s in enumerate(SETS) if int(self.n_images[i]) > 0 and int(self.n_boxes[i]) == 0]
        warnings = [f"no detections above conf={self.conf} in {s.upper()} ({int(self.n_images[SETS.index(s)])} "
                    "images): divergences involving it are undefined (null)" for s in empty]
        for w in warnings:
            log.warning("cluster_kl: %s", w)
        usable = [s for s in present if s not in empty]
        if len(emb) == 0 or len(usable) < 2:
            return None, {}, [], {}, warnings
        cell, cells, ks = self._cells(emb, cls)
        counts = {s: np.bincount(cell[sid == SETS.index(s)], minlength=len(cells)).astype(np.float64)
                  for s in usable}
        return counts, self._divergences(counts, cells), cells, ks, warnings

    def compute(self) -> dict:
        counts, div, cells, ks, warnings = self._analyse()
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

    def compute_ci(self, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
        """Bootstrap over crops within each set (clusters held fixed): multinomial resampling of cell counts."""
        with self.sync_context():
            res = self.compute()
            counts, _div, cells, _ks, _w = self._analyse()
            ci = {}
            if counts:
                rng = np.random.default_rng(seed)
                reps = {}
                for _ in range(n_boot):
                    rc = {s: rng.multinomial(int(v.sum()), v / v.sum()).astype(np.float64) for s, v in counts.items()}
                    for k, v in self._divergences(rc, cells).items():
                        reps.setdefault(k, []).append(v)
                for k, v in reps.items():
                    lo, hi = np.quantile(np.asarray(v), [alpha / 2, 1 - alpha / 2])
                    ci[k] = [float(lo), float(hi)]
            head = ci.get("kl_od_tm", [None, None])
            n = res["n_images"]
            extra = {k: v for k, v in res.items() if k not in ("value", "warnings")}
            extra.update({"ci": ci, "n_boot": n_boot, "alpha": alpha, "conf": self.conf, "smoothing": self.alpha,
                          "pca_dim": self.pca_dim, "k_max": self.k_max, "seed": self.seed,
                          "embedder": self.embedder.identity, "extractor": self.embedder.identity,
                          "detector": getattr(self.detector, "identity", type(self.detector).__name__),
                          "ci_method": "bootstrap over crops, clusters fixed", "units": "nats"})
            return record("cluster_kl", res["value"], n_a=n["od"], n_b=n["tm"], warnings=res["warnings"],
                          ci={"ci_low": head[0], "ci_high": head[1]}, extra=extra)
