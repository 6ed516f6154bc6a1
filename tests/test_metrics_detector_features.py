"""Cluster KL with the detector's own features (``embedder="detector"``) on the tiny zoo YOLO."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _metrics_helpers import canvases, shape_detector
from PIL import Image

from harness.errors import HarnessError
from harness.metrics.cluster_kl import ClusterKL
from harness.metrics.detector import YoloDetector, letterbox


@pytest.fixture(scope="module")
def yolo(zoo_dir):
    return YoloDetector(zoo_dir / "yolo", imgsz=64, conf=0.0)


def test_letterbox_keeps_aspect_and_centres():
    x, (gain, px, py) = letterbox(Image.new("RGB", (32, 16), (255, 0, 0)), 64)
    assert x.shape == (3, 64, 64) and gain == 2.0 and (px, py) == (0.0, 16.0)
    assert x[0, 32, 10] == 1.0 and x[0, 5, 10] == pytest.approx(114 / 255)  # image vs grey padding


def test_box_features_one_finite_vector_per_box(yolo):
    images = canvases(3, 1) + [Image.new("RGB", (64, 48), (30, 120, 200))]
    boxes = [shape_detector([im])[0][0] for im in images[:3]] + [np.array([[0, 0, 20, 20], [40, 20, 60, 44]])]
    feats = yolo.box_features(images, boxes)
    dim = feats[0].shape[1]
    assert dim > 0 and [f.shape for f in feats] == [(len(b), dim) for b in boxes]
    assert all(torch.isfinite(f).all() for f in feats)
    one_by_one = [yolo.box_features([im], [b], batch_size=1)[0] for im, b in zip(images, boxes)]
    for a, b in zip(feats, one_by_one):  # the batch does not change a box's features
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(feats[0][0], feats[0][1])  # different objects, different features
    assert yolo.box_features(images[:1], [np.zeros((0, 4))])[0].shape == (0, dim)


def test_cluster_kl_runs_end_to_end_on_detector_features(yolo):
    m = ClusterKL(yolo, embedder="detector", conf=0.0, min_crop=2, seed=0)
    m.update(canvases(4, 1), "od")
    m.update(canvases(4, 2, planted=1.0), "tm")
    res = m.compute_ci(n_boot=20)
    assert res["n_crops"]["od"] > 0 and res["n_crops"]["tm"] > 0
    assert np.isfinite(res["value"]) and res["value"] >= 0 and res["ci_low"] <= res["ci_high"]
    assert res["embedder"].startswith("detector-features:yolo:")
    with pytest.raises(HarnessError, match="embedder='detector' needs a detector with box_features"):
        ClusterKL(shape_detector, embedder="detector")


def test_score_api_accepts_the_detector_embedder(zoo_dir, tmp_path):
    from harness.metrics.score import score

    for name, seed in (("od", 1), ("tm", 2)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(canvases(3, seed)):
            im.save(tmp_path / name / f"{i}.png")
    res = score("cluster_kl", tmp_path / "od", tmp_path / "tm", extractor="detector", detector=str(zoo_dir / "yolo"),
                conf=0.0, n_boot=10, min_crop=2)
    assert res["extractor"].startswith("detector-features:") and res["n_crops"]["od"] > 0
    assert np.isfinite(res["value"])
