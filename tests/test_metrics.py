"""Metric classes, extractors, image handling, cache, registry and the ``harness score`` command."""

import json
import logging

import numpy as np
import pytest
import torch
from _metrics_helpers import ColorStats, PoolNet, canvases, empty_detector, shape_detector
from PIL import Image

from harness.errors import HarnessError, UnsafeCheckpointError
from harness.metrics import frechet
from harness.metrics.clip_score import CLIPScore, clip_scores
from harness.metrics.cluster_kl import ClusterKL
from harness.metrics.detector import YoloDetector
from harness.metrics.features import (
    ModuleExtractor,
    folder_features,
    get_extractor,
    load_features,
    save_features,
)
from harness.metrics.fid import CMMD, FID, KID
from harness.metrics.images import clean_resize, float_to_uint8, to_batch
from harness.metrics.prdc import PRDC
from harness.metrics.registry import METRICS, get_metric_class, register_metric


def _pool():
    return ModuleExtractor(PoolNet(), input_size=16)


def _images(n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 16, 16), generator=g) * scale).to(torch.uint8)


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from harness.models.tokenizer import clip_tokenizer

    d = tmp_path_factory.mktemp("hfclip")
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=clip_tokenizer()).save_pretrained(d)
    return d


# ------------------------------------------------------------------ image handling


def test_float_images_round_like_png_not_truncate(tmp_path):
    x = torch.full((1, 3, 4, 4), 127.6 / 255)
    assert int(float_to_uint8(x)[0, 0, 0, 0]) == 128  # truncation would give 127
    arr = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil path
    Image.fromarray(arr).save(tmp_path / "a.png")
    from_png = to_batch([Image.open(tmp_path / "a.png")], None)
    assert torch.equal(to_batch(x, None), from_png)


def test_float_out_of_range_is_refused():
    with pytest.raises(HarnessError, match=r"must be in \[0, 1\].*\(x \+ 1\) / 2"):
        to_batch(torch.full((1, 3, 4, 4), -0.5), None)


def test_grayscale_becomes_rgb_and_mixed_sizes_resize_each():
    g = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(to_batch(g, None), g.expand(-1, 3, -1, -1))
    pil = [Image.new("L", (10, 6), 50), Image.new("RGB", (7, 9), (1, 2, 3)), Image.new("RGBA", (8, 8))]
    assert to_batch(pil, 16).shape == (3, 3, 16, 16)
    with pytest.raises(HarnessError, match="mixed sizes.*input_size"):
        to_batch(pil, None)


def test_clean_resize_is_pil_bicubic_on_uint8():
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(arr).resize((16, 16), Image.BICUBIC))
    np.testing.assert_array_equal(clean_resize(arr, 16), want)
    assert clean_resize(arr[:16, :16], 16) is not None and clean_resize(want, 16) is want


# ------------------------------------------------------------------ extractors


def test_extractor_specs_and_errors(zoo_dir, tmp_path):
    clip = get_extractor(f"clip:{zoo_dir / 'clip'}")
    assert clip.input_size == 32 and clip.dim == 32 and clip.identity.startswith("clip:")
    f = clip.batch([Image.new("RGB", (50, 40), (200, 10, 10))])
    assert f.shape == (1, 32) and torch.allclose(f.norm(dim=1), torch.ones(1))
    with pytest.raises(HarnessError, match="unknown kind 'vgg'; known: clip, inception, dinov2"):
        get_extractor("vgg:x")
    with pytest.raises(HarnessError, match="not a folder and not an open_clip model name"):
        get_extractor(f"clip:{tmp_path / 'missing'}")
    with pytest.raises(HarnessError, match="inception: .*torch-fidelity"):
        get_extractor("inception")


def test_dinov2_extractor_from_local_folder(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path)
    ext = get_extractor(f"dinov2:{tmp_path}")
    # dgm-eval's 224 px, not the config's pretraining size (518 for the hub's DINOv2)
    assert ext.input_size == 224 and ext.dim == 32
    assert ext.batch(_images(3, 0)).shape == (3, 32)
    at28 = ext.variant(input_size=28)
    assert at28.input_size == 28 and at28.identity != ext.identity and at28.model is ext.model


def test_module_extractor_identity_tracks_weights():
    a, b = ModuleExtractor(PoolNet(seed=0), input_size=16), ModuleExtractor(PoolNet(seed=1), input_size=16)
    assert a.identity != b.identity and a.identity == ModuleExtractor(PoolNet(seed=0)).identity


# ------------------------------------------------------------------ FID / KID / CMMD / PRDC


def test_fid_self_zero_and_agrees_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = _images(80, 0), _images(80, 1, scale=0.7)
    m = FID(_pool())
    m.update(a, real=True)
    m.update(a, real=False)
    assert float(m.compute()) < 1e-9
    m.reset()
    for chunk in a.split(32):  # batching must not matter: running sums
        m.update(chunk, real=True)
    m.update(b, real=False)
    ref = FrechetInceptionDistance(feature=PoolNet(), input_img_size=(3, 16, 16))
    ref.update(a, real=True)
    ref.update(b, real=False)
    assert float(m.compute()) == pytest.approx(float(ref.compute()), rel=1e-5)
    # The running-sum route equals the route from the kept features.
    assert float(m.compute()) == pytest.approx(m.statistic(m.features("real", "real_ci"),
                                                           m.features("fake", "fake_ci")), rel=1e-2)


def test_fid_warns_below_feature_dim_and_recommends_kid(caplog):
    m = FID(_pool())
    m.update(_images(5, 0), real=True)
    m.update(_images(5, 1), real=False)
    with caplog.at_level(logging.WARNING):
        m.compute()
    assert "FID from 5 images with 8-dimensional features" in caplog.text and "KID" in caplog.text
    res = m.compute_ci(n_boot=10)
    assert res["warnings"] and res["n_a"] == 5 and res["extractor"].startswith("module:PoolNet")


def test_fid_interval_and_provenance():
    m = FID(_pool())
    m.update(_images(60, 0), real=True)
    m.update(_images(60, 1, scale=0.8), real=False)
    res = m.compute_ci(n_boot=30, seed=1)
    assert res["ci_low"] <= res["ci_high"] and res["ci_high"] > 0
    assert res == {**res, "resize": "pil_bicubic_uint8", "input_dtype": "uint8", "n_a": 60, "n_b": 60}
    assert "torchmetrics" in res["versions"] and res["dim"] == 8
    assert m.compute_ci(n_boot=30, seed=1)["ci_low"] == res["ci_low"]  # seeded


def test_fid_memory_is_flat_without_interval_buffer():
    m = FID(_pool(), ci_samples=0)
    for i in range(5):
        m.update(_images(40, i), real=True)
    assert not hasattr(m, "real_ci") and m.real_outer.shape == (8, 8) and int(m.real_n) == 200
    m.update(_images(40, 9), real=False)
    res = m.compute_ci()
    assert res["ci_low"] is None and "no interval" in res["warnings"][-1] and res["value"] > 0


def test_kid_cmmd_zero_for_identical_larger_when_shifted():
    a = _images(60, 0)
    for cls, kw in ((KID, {"subset_size": 30, "subsets": 20}), (CMMD, {})):
        same, shifted = cls(_pool(), **kw), cls(_pool(), **kw)
        same.update(a, real=True)
        same.update(a, real=False)
        shifted.update(a, real=True)
        shifted.update(_images(60, 1, scale=0.6), real=False)
        v_same = same.compute()[0] if cls is KID else same.compute()
        v_shift = shifted.compute()[0] if cls is KID else shifted.compute()
        assert abs(float(v_same)) < 1e-3 and float(v_shift) > 10 * max(abs(float(v_same)), 1e-4)
        res = shifted.compute_ci(n_boot=20)
        assert res["ci_low"] < res["ci_high"] and res["value"] == pytest.approx(float(v_shift))


def test_one_feature_pass_serves_fid_kid_cmmd_prdc():
    ext = _pool()
    fa, fb = ext.batch(_images(40, 0)), ext.batch(_images(40, 1, scale=0.8))
    out = {}
    for cls in (FID, KID, CMMD, PRDC):
        m = cls(ext)
        m.update_features(fa, real=True)
        m.update_features(fb, real=False)
        out[cls.__name__] = m.compute_ci(n_boot=10)
    assert out["CMMD"]["value"] == pytest.approx(frechet.cmmd(fa.double().numpy(), fb.double().numpy()))
    assert set(out["PRDC"]["value"]) == {"precision", "recall", "density", "coverage"}
    assert isinstance(out["PRDC"]["ci_low"], dict)
    with pytest.raises(HarnessError, match=r"features must be \[N, 8\]"):
        FID(ext).update_features(torch.zeros(3, 5), real=True)


def test_reservoir_caps_kept_features_with_warning():
    m = KID(_pool(), max_samples=50, subset_size=20, subsets=5)
    m.update(_images(40, 0), real=True)
    m.update(_images(40, 1), real=True)
    m.update(_images(40, 2), real=False)
    assert len(m.features("real")) == 50 and int(m.real_n) == 80
    assert any("random sample of 50" in w for w in m.compute_ci(n_boot=5)["warnings"])


def test_too_few_images_is_an_error():
    m = KID(_pool())
    m.update(_images(1, 0), real=True)
    m.update(_images(3, 1), real=False)
    with pytest.raises(HarnessError, match="at least 2 images per set, got 1"):
        m.compute()


# ------------------------------------------------------------------ cache


def test_feature_cache_roundtrip_and_refuses_other_extractor(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(_images(1, i)[0].permute(1, 2, 0).numpy()).resize((20, 24)).save(folder / f"{i}.png")
    ext = _pool()
    f1 = folder_features(folder, ext, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").glob("*.npz"))
    assert len(files) == 1
    z = load_features(files[0], ext)
    np.testing.assert_allclose(z["mean"], f1.mean(0), rtol=1e-6)
    assert int(z["count"]) == 6 and z["meta"]["resize"] == "pil_bicubic_uint8"
    np.testing.assert_array_equal(folder_features(folder, ext, cache_dir=tmp_path / "cache"), f1)
    with pytest.raises(HarnessError, match="not comparable"):
        load_features(files[0], ModuleExtractor(PoolNet(seed=3), input_size=16))
    # Reference statistics from the cache give the same FID as the images.
    fb = ext.batch(_images(10, 9))
    direct, cached = FID(ext), FID(ext)
    direct.update_features(f1, real=True)
    cached.load_reference(files[0])
    for m in (direct, cached):
        m.update_features(fb, real=False)
    assert float(cached.compute()) == pytest.approx(float(direct.compute()), rel=1e-6)
    save_features(tmp_path / "x.npz", f1, "other")
    with pytest.raises(HarnessError, match="made by 'other'"):
        FID(ext).load_reference(tmp_path / "x.npz")


# ------------------------------------------------------------------ CLIP score


def test_clip_scores_clamp_per_image_not_the_mean():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [-1.0, 0.2]])
    s = clip_scores(img, txt)
    assert s[0] == pytest.approx(100.0) and s[1] == 0.0
    assert s.mean() == pytest.approx(50.0)  # torchmetrics' mean-then-clamp would give ~1.0


@pytest.mark.parametrize("backend", ["open_clip", "transformers"])
def test_clip_score_matches_manual_cosines(backend, zoo_dir, hf_clip_dir):
    spec = f"clip:{zoo_dir / 'clip'}" if backend == "open_clip" else f"hf:{hf_clip_dir}"
    m = CLIPScore(spec)
    imgs = [Image.new("RGB", (40, 30), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    prompts = ["a red square", "green", "a photo of the sea"]
    m.update(imgs[:2], prompts[:2])
    m.update(imgs[2:], prompts[2:])
    b = m.backend
    x = to_batch(imgs, b.input_size).float() / 255
    x = (x - torch.tensor(b.mean).view(1, 3, 1, 1)) / torch.tensor(b.std).view(1, 3, 1, 1)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(b.image(x), b.text(prompts), dim=-1)
    np.testing.assert_allclose(m.scores(), (100 * cos.clamp(min=0)).double().numpy(), atol=1e-4)
    res = m.compute_ci(n_boot=50)
    assert res["n_a"] == 3 and len(res["per_image"]) == 3 and res["extractor"]
    with pytest.raises(HarnessError, match="2 images but 1 prompts"):
        m.update(imgs[:2], ["one"])


# ------------------------------------------------------------------ cluster KL


def _cluster_kl(tm, od=None, seed=0, **kw):
    m = ClusterKL(shape_detector, ModuleExtractor(ColorStats(), input_size=16), seed=seed, **kw)
    m.update(od if od is not None else canvases(50, 1), "od")
    m.update(tm, "tm")
    return m


def test_cluster_kl_near_zero_for_one_set_and_monotone_in_planted_change():
    od = canvases(50, 1)
    same = _cluster_kl(canvases(50, 2), od).compute()
    kls = [_cluster_kl(canvases(50, 2, planted=f), od).compute()["kl_od_tm"] for f in (0.3, 0.6, 1.0)]
    assert same["kl_od_tm"] < 0.25 and same["class_kl_od_tm"] < 0.05
    assert same["kl_od_tm"] < kls[0] < kls[1] < kls[2] and kls[2] > 1.0
    assert same["n_crops"]["od"] == 100 and same["per_class"][0]["name"] in ("0", "1")


def test_cluster_kl_per_class_finds_the_changed_class_and_is_deterministic():
    od = canvases(50, 1)
    tm = canvases(50, 2)
    for im in tm:  # recolour only the discs (class 1): fill pixels that are blue or yellow
        a = np.asarray(im).copy()
        disc = ((a[..., 2] > 150) & (a[..., 0] < 100)) | ((a[..., 0] > 150) & (a[..., 1] > 150) & (a[..., 2] < 100))
        a[disc] = (200, 40, 220)
        im.paste(Image.fromarray(a))
    r1 = _cluster_kl(tm, od).compute()
    r2 = _cluster_kl(list(reversed(tm)), od).compute()  # order of updates does not matter
    assert r1["per_class"][0]["class"] == 1
    assert r1["per_class"][0]["contribution_od_tm"] > 5 * r1["per_class"][1]["contribution_od_tm"]
    assert r1["kl_od_tm"] == r2["kl_od_tm"] and r1["js_od_tm"] == r2["js_od_tm"]


def test_cluster_kl_interval_and_base_model_pair():
    m = _cluster_kl(canvases(40, 2, planted=0.5))
    m.update(canvases(40, 3), "bm")
    res = m.compute_ci(n_boot=100)
    assert 0 < res["ci_low"] < res["ci_high"] < 10 and res["value"] > 0
    assert res["kl_bm_tm"] > 0 and res["kl_od_bm"] < res["kl_bm_tm"] and "kl_bm_tm" in res["ci"]


def test_cluster_kl_no_detections_is_a_clear_result_not_nan():
    m = ClusterKL(empty_detector, ModuleExtractor(ColorStats(), input_size=16))
    m.update(canvases(4, 1), "od")
    m.update(canvases(4, 2), "tm")
    res = m.compute_ci(n_boot=10)
    assert res["value"] is None and res["ci_low"] is None and res["n_crops"] == {"od": 0, "bm": 0, "tm": 0}
    assert any("no detections above conf=0.25 in TM (4 images)" in w for w in res["warnings"])
    with pytest.raises(HarnessError, match="set must be one of od, bm, tm"):
        m.update(canvases(1, 1), "xx")


def test_yolo_detector_zoo_folder_and_pickle_refusal(zoo_dir, tmp_path):
    det = YoloDetector(zoo_dir / "yolo", imgsz=64, conf=0.0)
    out = det(canvases(2, 1))
    assert len(out) == 2 and all(b.shape[-1] == 4 and len(b) == len(c) == len(s) for b, c, s in out)
    (tmp_path / "w.pt").write_bytes(b"not really")
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        YoloDetector(tmp_path / "w.pt")


# ------------------------------------------------------------------ registry and CLI


def test_registry_names_and_unknown():
    for name in ("fid", "fid_clip", "kid", "cmmd", "clip_score", "cluster_kl", "prdc", "artifact_score"):
        assert get_metric_class(name).__name__
    with pytest.raises(HarnessError, match="unknown; known: artifact_score, clip_score, cluster_kl, cmmd"):
        get_metric_class("fjd")
    register_metric("_test_kid", "harness.metrics.fid:KID")
    try:
        assert get_metric_class("_test_kid") is KID
    finally:
        METRICS.pop("_test_kid")
    register_metric("_test_missing", "harness.nowhere:Nothing")
    try:
        with pytest.raises(HarnessError, match="not available"):
            get_metric_class("_test_missing")
    finally:
        METRICS.pop("_test_missing")


def _write_set(folder, n, seed, scale=1.0):
    folder.mkdir()
    for i in range(n):
        Image.fromarray(_images(1, seed * 100 + i, scale)[0].permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
    return folder


def test_cli_score_json_and_errors(zoo_dir, tmp_path, capsys):
    from harness.cli import main

    a, b = _write_set(tmp_path / "a", 8, 1), _write_set(tmp_path / "b", 8, 2, 0.5)
    clip = f"clip:{zoo_dir / 'clip'}"
    assert main(["score", "kid", str(a), str(b), "--extractor", clip, "--json", "--n-boot", "10"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"value", "ci_low", "ci_high", "n_a", "n_b", "extractor", "provenance"} <= set(res)
    assert res["n_a"] == 8 and res["extractor"].startswith("clip:") and res["versions"]["torch"]
    (tmp_path / "p.txt").write_text("a\nb\n")
    assert main(["score", "clip_score", str(a), "--prompts", str(tmp_path / "p.txt"), "--extractor", clip]) == 2
    assert "2 prompts for 8 images" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(8)))
    assert main(["score", "clip_score", str(a), "--prompts", str(tmp_path / "p.txt"), "--extractor", clip]) == 0
    assert capsys.readouterr().out.startswith("clip_score = ")
    assert main(["score", "fid", str(a), str(b), "--extractor", "inception"]) == 2
    assert "torch-fidelity" in capsys.readouterr().err


def test_cluster_kl_interval_contains_its_estimate_on_identical_sets():
    """Two identical sets have KL 0; a plain percentile bootstrap put the interval above it."""
    od = canvases(40, 1)
    res = _cluster_kl(list(od), od).compute_ci(n_boot=100)
    assert res["value"] == pytest.approx(0.0, abs=1e-12)
    assert res["ci_low"] == 0.0 <= res["value"] <= res["ci_high"]
    for k, (lo, hi) in res["ci"].items():
        assert lo <= res[k] <= hi, k


def test_cluster_kl_paired_difference_null_and_planted():
    """BM and TM drawn alike (two seed sets of one model): the permutation interval of
    KL(OD||TM) - KL(OD||BM) straddles 0; a planted change in TM moves it above 0."""
    od = canvases(40, 1)
    null = _cluster_kl(canvases(40, 2), od)
    null.update(canvases(40, 3), "bm")
    d0 = null.compute_ci(n_boot=200)["paired_diff"]
    assert d0["n_pairs"] == 40 and d0["ci_low"] <= d0["diff"] <= d0["ci_high"]
    assert d0["ci_low"] < 0 < d0["ci_high"]
    planted = _cluster_kl(canvases(40, 2, planted=1.0), od)
    planted.update(canvases(40, 3), "bm")
    d1 = planted.compute_ci(n_boot=200)["paired_diff"]
    assert d1["ci_low"] > 0 and d1["diff"] > 0.5
    with pytest.raises(HarnessError, match="2 pair ids for 3 images"):
        planted.update(canvases(3, 4), "tm", pairs=[0, 1])
