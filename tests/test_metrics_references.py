"""Set metrics against their references, on the tiny zoo's CLIP: each metric's own extractor default,
the preprocessing its reference uses (transcribed here from clean-fid and google-research/cmmd, not
imported), KID's small-N handling, and the offline check that runs before an eval generates anything."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.errors import ConfigError, HarnessError
from harness.metrics import frechet
from harness.metrics.features import ModuleExtractor, get_extractor
from harness.metrics.fid import CMMD, FID, KID, FIDClip, FIDClipL2, FIDDinov2
from harness.metrics.images import fit_square
from harness.metrics.prdc import PRDC
from harness.metrics.registry import FEATURE_METRICS, get_metric_class

ROOT = Path(__file__).resolve().parents[1]


def _photos(n: int, seed: int, shift: float = 0.0) -> list[Image.Image]:
    """Smooth, non-square images (landscape and portrait), so resizing and cropping both matter."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (40, 56) if i % 2 else (60, 44)
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        c = rng.uniform(0, 1, (3, 3))
        a = np.stack([c[k, 0] + shift + c[k, 1] * np.sin(6 * xx + 3 * c[k, 2]) * np.cos(5 * yy) for k in range(3)], -1)
        a += rng.normal(0, 0.05, a.shape)
        out.append(Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)))
    return out


def _save(folder: Path, images) -> Path:
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i:03d}.png")
    return folder


# ------------------------------------------------------------------ transcribed references

def _cleanfid_clip_features(folder: Path, model, size: int, mean, std) -> np.ndarray:
    """clean-fid's CLIP features (cleanfid/clip_features.py, resize.py), with the model's input size and
    normalisation constants (clean-fid hard-codes ViT-B/32's: 224 and OpenAI's mean/std):
      img_preprocess_clip: PIL -> Resize(224, BICUBIC) -> CenterCrop(224) -> uint8 array
      ResizeDataset:       ToTensor()(uint8) * 255
      CLIP_fx.__call__:    x / 255 -> Normalize(mean, std) -> model.encode_image (raw, not normalised)"""
    import torchvision.transforms as T

    prep = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    batch = []
    for f in sorted(folder.glob("*.png")):
        arr = np.asarray(prep(Image.fromarray(np.asarray(Image.open(f).convert("RGB"))))).clip(0, 255).astype(np.uint8)
        batch.append(T.ToTensor()(arr) * 255)
    x = T.Normalize(mean, std)(torch.stack(batch) / 255.0)
    with torch.no_grad():
        return model.encode_image(x).numpy()


def _cleanfid_frechet(f1: np.ndarray, f2: np.ndarray, eps: float = 1e-6) -> float:
    """cleanfid.fid.fid_from_feats + frechet_distance (scipy sqrtm, offset on a singular product)."""
    from scipy import linalg

    mu1, sigma1 = np.mean(f1, axis=0), np.cov(f1, rowvar=False)
    mu2, sigma2 = np.mean(f2, axis=0), np.cov(f2, rowvar=False)
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _cmmd_reference_embeddings(images, model, size: int, mean, std) -> np.ndarray:
    """google-research/cmmd: io_util._center_crop_and_resize (floor offsets, PIL bicubic), /255,
    embedding._resize_bicubic (torch bicubic to the same size), processor normalisation, embeds / norm."""
    out = []
    for im in images:
        w, h = im.size
        side = min(w, h)
        top, left = (h - side) // 2, (w - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), resample=Image.BICUBIC)
        out.append(np.asarray(im).astype(np.float32) / 255.0)
    x = torch.from_numpy(np.stack(out).transpose(0, 3, 1, 2))
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic")
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        e = model.encode_image((x - m) / s)
    return (e / torch.linalg.norm(e, dim=-1, keepdim=True)).numpy()


def _cmmd_reference_mmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """cmmd/distance.py mmd(), in numpy float64 (the reference's float32 jax loses ~1e-4 relative to
    cancellation: k_xx + k_yy - 2 k_xy is ~1e-4 of its terms)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    gamma = 1 / (2 * sigma**2)
    xx, yy, xy = x @ x.T, y @ y.T, x @ y.T
    xs, ys = np.diag(xx), np.diag(yy)
    k_xx = np.mean(np.exp(-gamma * (-2 * xx + xs[:, None] + xs[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * xy + xs[:, None] + ys[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * yy + ys[:, None] + ys[None, :])))
    return float(scale * (k_xx + k_yy - 2 * k_xy))


@pytest.fixture(scope="module")
def tiny_clip(zoo_dir):
    ext = get_extractor(f"clip:{zoo_dir / 'clip'}")
    return ext, f"clip:{zoo_dir / 'clip'}"


# ------------------------------------------------------------------ FID-CLIP = clean-fid's

def test_score_fid_clip_equals_cleanfid_clip_fid(tiny_clip, tmp_path, capsys):
    from harness.cli import main

    ext, spec = tiny_clip
    a = _save(tmp_path / "a", _photos(48, 1))  # more images than the 32 feature dimensions
    b = _save(tmp_path / "b", _photos(48, 2, shift=0.3))  # measured: 2.3e-7 relative
    assert main(["score", "fid_clip", str(a), str(b), "--extractor", spec, "--json", "--n-boot", "5"]) == 0
    res = json.loads(capsys.readouterr().out)
    ref = _cleanfid_frechet(*(_cleanfid_clip_features(d, ext.model, ext.input_size, ext.mean, ext.std) for d in (a, b)))
    assert res["value"] == pytest.approx(ref, rel=1e-6)
    assert res["metric"] == "fid_clip" and res["crop"] == "resize-crop" and res["l2_normalized"] is False
    assert "clean-fid" in res["reference"]
    # the normalised variant is another number, bounded by the unit sphere (what the old fid_clip was)
    assert main(["score", "fid_clip_l2", str(a), str(b), "--extractor", spec, "--json", "--n-boot", "5"]) == 0
    l2 = json.loads(capsys.readouterr().out)
    assert l2["l2_normalized"] is True and l2["value"] < 4.0 and l2["value"] != pytest.approx(ref, rel=0.1)
    capsys.readouterr()


def test_cmmd_equals_the_reference_on_its_crop_and_normalisation(tiny_clip):
    ext, spec = tiny_clip
    real, fake = _photos(30, 3), _photos(30, 4, shift=0.2)
    m = CMMD(spec)
    m.update(real, real=True)
    m.update(fake, real=False)
    ref = _cmmd_reference_mmd(*(_cmmd_reference_embeddings(s, ext.model, ext.input_size, ext.mean, ext.std)
                                for s in (real, fake)))
    assert float(m.compute()) == pytest.approx(ref, rel=1e-5)
    assert m.extractor.crop == "crop-resize" and m.extractor.normalize
    # without the crop (the old stretch) the features, and so the value, differ on these non-square images
    stretched = CMMD(spec, crop="none")
    stretched.update(real, real=True)
    stretched.update(fake, real=False)
    assert float(stretched.compute()) != pytest.approx(ref, rel=1e-3)


def test_crops_match_torchvision_and_the_cmmd_reference():
    import torchvision.transforms as T

    arr = np.random.default_rng(0).integers(0, 256, (37, 61, 3), dtype=np.uint8)
    for size in (16, 32):
        want = np.asarray(T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)(
            Image.fromarray(arr))))
        np.testing.assert_array_equal(fit_square(arr, size, "resize-crop"), want)
        np.testing.assert_array_equal(fit_square(arr.transpose(1, 0, 2).copy(), size, "resize-crop"),
                                      np.asarray(T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode
                                                                             .BICUBIC)(Image.fromarray(
                                                                                 arr.transpose(1, 0, 2).copy())))))
    im = Image.fromarray(arr)
    want = np.asarray(im.crop((12, 0, 49, 37)).resize((16, 16), Image.BICUBIC))  # floor((61 - 37) / 2) = 12
    np.testing.assert_array_equal(fit_square(arr, 16, "crop-resize"), want)
    with pytest.raises(HarnessError, match="crop 'middle': unknown; known: none, resize-crop, crop-resize"):
        fit_square(arr, 16, "middle")


# ------------------------------------------------------------------ each metric's own extractor

DEFAULTS = {"fid": "inception", "fid_clip": "clip:ViT-B-32:openai", "fid_clip_l2": "clip:ViT-B-32:openai",
            "fid_dinov2": "dinov2:facebook/dinov2-large", "kid": "inception", "cmmd": "clip:ViT-L-14-336:openai",
            "prdc": "inception"}


@pytest.mark.parametrize("name", FEATURE_METRICS)
def test_each_metric_owns_its_reference_extractor(name):
    cls = get_metric_class(name)
    assert cls.default_extractor == DEFAULTS[name] and cls.reference


@pytest.mark.parametrize("name,crop,l2", [("fid", "resize-crop", False), ("fid_clip", "resize-crop", False),
                                          ("fid_clip_l2", "resize-crop", True), ("kid", "resize-crop", False),
                                          ("cmmd", "crop-resize", True), ("prdc", "resize-crop", False)])
def test_each_metric_prepares_clip_features_its_references_way(name, crop, l2, tiny_clip):
    ext, _ = tiny_clip
    got = get_metric_class(name).prepare_extractor(ext)
    assert (got.crop, got.normalize) == (crop, l2) and got.model is ext.model  # one model, several variants
    assert ("+l2" in got.identity) == l2 and crop in got.identity


def test_dinov2_at_224_and_inception_resize_modes(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path)
    d = FIDDinov2.prepare_extractor(f"dinov2:{tmp_path}")
    assert d.input_size == 224 and d.crop == "none" and not d.normalize and "224px" in d.identity

    class Seen(torch.nn.Module):  # records the input sizes it is given
        sizes: list = []

        def forward(self, x):
            self.sizes.append(tuple(x.shape[-2:]))
            return x.float().mean((2, 3))

    class FakeInception(ModuleExtractor):
        kind = "inception"
        resizes = ("clean", "legacy-torchmetrics")

    images = [Image.new("RGB", (20, 12)), Image.new("RGB", (8, 8)), Image.new("RGB", (20, 12))]
    clean = FID.prepare_extractor(FakeInception(Seen(), input_size=16))
    clean.batch(images)
    assert Seen.sizes == [(16, 16)]  # resized (PIL bicubic, stretched) before the model, one batch
    Seen.sizes.clear()
    legacy = FID.prepare_extractor(FakeInception(Seen(), input_size=16), resize="legacy-torchmetrics")
    assert legacy.batch(images).shape == (3, 3) and sorted(Seen.sizes) == [(8, 8), (12, 20)]  # native sizes
    assert legacy.identity.endswith("+legacy-torchmetrics") and clean.identity != legacy.identity
    with pytest.raises(HarnessError, match="resize 'legacy-torchmetrics': clip:fake supports clean$"):
        FIDClip.prepare_extractor(_clip_like(), resize="legacy-torchmetrics")  # Inception's mode only


def _clip_like():
    e = ModuleExtractor(torch.nn.Flatten(), input_size=4)
    e.kind, e.model_id = "clip", "clip:fake"
    return e


# ------------------------------------------------------------------ KID below 1000 images

def test_kid_subset_larger_than_n_warns_and_reports_a_real_spread():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 0.3
    m = KID(num_features=8)  # subset_size 1000 > 40
    m.update_features(real, real=True)
    m.update_features(fake, real=False)
    res = m.compute_ci(n_boot=40)
    assert res["value"] == pytest.approx(frechet.kid(real, fake, subset_size=40, subsets=100)[0])
    assert frechet.kid(real, fake, subset_size=40, subsets=100)[1] == pytest.approx(0.0, abs=1e-12)  # the old std
    assert res["kid_std_method"] == "bootstrap" and res["kid_std"] > 0
    assert any("subset_size 1000 >= the 40 images" in w for w in res["warnings"])
    assert float(m.compute()[1]) > 0
    small = KID(num_features=8, subset_size=20, subsets=50)
    small.update_features(real, real=True)
    small.update_features(fake, real=False)
    res = small.compute_ci(n_boot=20)
    assert res["kid_std_method"] == "subsets" and res["kid_std"] > 0 and not res["warnings"]


def test_prdc_and_fid_keep_module_features_as_given():
    e = ModuleExtractor(torch.nn.Flatten(), input_size=2, normalize=False)
    assert PRDC.prepare_extractor(e) is e and CMMD.prepare_extractor(e) is e and FIDClipL2.prepare_extractor(e) is e


# ------------------------------------------------------------------ suites: defaults, rows, offline check

SUITE = """
name: t
prompts:
  dom: {heldout: true, kind: in_domain}
reference: {heldout: true}
metrics:
  fid: {}
  fid_clip: {}
  fid_dinov2: {}
  kid: {}
  cmmd: {}
  local: {metric: cmmd, settings: {extractor: models.clip}}
"""


def test_suite_metrics_get_their_own_extractor_unless_set(tmp_path, zoo_dir):
    from harness.eval.suite import extractor_spec, load_suite

    p = tmp_path / "s.yaml"
    p.write_text(SUITE)
    s = load_suite(p, [f"models.clip={zoo_dir / 'clip'}"])
    for label in ("fid", "fid_clip", "fid_dinov2", "kid", "cmmd"):
        assert extractor_spec(s, label) == DEFAULTS[label], label
    assert extractor_spec(s, "local") == f"clip:{zoo_dir / 'clip'}"


def test_set_metric_rows_name_their_extractor_and_n(tmp_path, zoo_dir):
    """set_metric asks for each metric's own extractor (here answered by the tiny CLIP, as offline there
    is no Inception or ViT-L/14@336) and writes its identity and the reference count into every row."""
    from harness.eval import plan, scoring
    from harness.eval.suite import load_suite, metric_class

    p = tmp_path / "s.yaml"
    p.write_text(SUITE)
    suite = load_suite(p, [f"models.clip={zoo_dir / 'clip'}"])
    refs = [str(f) for f in _save(tmp_path / "ref", _photos(6, 5)).iterdir()]
    items = [plan.Item("dom", i, f"p{i}", 0) for i in range(5)]
    ck = [plan.Checkpoint("base", "base", "b"), plan.Checkpoint("cand", "candidate", "c")]
    per = []
    for c, seed in (("base", 6), ("cand", 7)):
        folder = _save(tmp_path / c, _photos(5, seed))
        per += [{"checkpoint": c, "subset": "dom", "index": i, "seed": 0, "image": str(folder / f"{i:03d}.png"),
                 "nonfinite": False} for i in range(5)]
    asked = []
    sc = scoring.Scoring(run_dir=tmp_path, suite=suite, ckpts=ck, items=items, per_image=per,
                         reference=[Path(r) for r in sorted(refs)], cache_dir=tmp_path / "cache")
    tiny = get_extractor(f"clip:{zoo_dir / 'clip'}")
    sc.extractor = lambda spec: asked.append(spec) or tiny  # type: ignore[method-assign]
    for label in ("fid_clip", "cmmd", "local"):
        name = suite.metric_name(label)
        scoring.compute(sc, label, name, metric_class(name), dict(suite.metrics[label].settings), ["dom"])
    assert asked[:2] == ["clip:ViT-B-32:openai", "clip:ViT-L-14-336:openai"]
    assert asked[2] == f"clip:{zoo_dir / 'clip'}"
    by = {(r["metric"], r["checkpoint"]): r for r in sc.rows}
    assert by[("fid_clip", "base")]["extractor"].endswith("+resize-crop")
    assert by[("cmmd", "cand")]["extractor"].endswith("+l2+crop-resize")
    assert all(r["n"] == 5 and r["n_ref"] == 6 for r in sc.rows if r["metric"] in ("fid_clip", "cmmd", "local"))


def test_missing_default_extractor_offline_fails_before_generating(tmp_path, zoo_dir):
    from _report_helpers import make_dataset

    from harness.eval.runner import run_eval
    from harness.eval.suite import check_extractors, load_suite

    suite = ROOT / "eval" / "tiny-cpu.yaml"
    ok = [f"models.clip={zoo_dir / 'clip'}"]
    check_extractors(load_suite(suite, ok), "tiny-cpu")  # the shipped offline suite passes the check
    with pytest.raises(ConfigError) as e:
        run_eval(suite, base=str(zoo_dir / "sd"), candidates=[str(zoo_dir / "sd")], out=tmp_path / "run",
                 data=make_dataset(tmp_path / "data"), overrides=[*ok, "metrics.cmmd.settings.extractor=null"], progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "metric 'cmmd' (cmmd) uses clip:ViT-L-14-336:openai" in msg
    assert "running offline" in msg and "--set metrics.cmmd.settings.extractor=clip:DIR" in msg
    assert not (tmp_path / "run").exists()  # nothing generated, no run folder
    with pytest.raises(ConfigError, match=r"metric 'clip_score' \(clip_score\) uses clip:/nope/clip: .*"
                                          r"--set models.clip=DIR"):
        check_extractors(load_suite(suite, ["models.clip=/nope/clip"]), "tiny-cpu")
