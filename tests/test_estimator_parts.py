"""Fast tests of the estimator's parts: ratings tables, planted artifacts, math, preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from harness.errors import HarnessError
from harness.estimator import artifacts as art
from harness.estimator.dataset import letterbox, noise_seed, noised, parse_timesteps
from harness.estimator.metric import bootstrap_ci
from harness.estimator.table import read_ratings
from harness.estimator.train import (
    beats_baseline,
    class_weights,
    evaluate,
    lr_lambda,
    pearson,
    spearman,
    split_groups,
    within,
)


def _img(path, color=(120, 80, 40), size=(24, 16)):
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    for i in range(4):
        _img(tmp_path / f"im{i}.png", (30 * i, 40, 50))
    return tmp_path


# --- ratings tables ------------------------------------------------------------------------------

def test_generic_csv_resolves_paths_and_defaults(images):
    pd.DataFrame({"image": ["im0.png", "im1.png"], "rating": [0, 4.5], "prompt": ["a", "b"]}).to_csv(
        images / "r.csv", index=False)
    df = read_ratings(images / "r.csv")
    assert list(df.columns) == ["image", "rating", "n_ratings", "group", "prompt", "seed"]
    assert df["image"].tolist() == [str((images / "im0.png").resolve()), str((images / "im1.png").resolve())]
    assert df["rating"].tolist() == [0.0, 4.5]
    assert df["group"].tolist() == df["image"].tolist()  # no group column: each image is its own group
    assert df["prompt"].tolist() == ["a", "b"]


def test_jsonl_and_parquet(images):
    rows = [{"image": "im0.png", "rating": 1, "seed": 7}, {"image": "im2.png", "rating": 3, "seed": 8}]
    (images / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pd.DataFrame(rows).to_parquet(images / "r.parquet")
    for name in ("r.jsonl", "r.parquet"):
        df = read_ratings(images / name)
        assert df["rating"].tolist() == [1.0, 3.0] and df["seed"].tolist() == [7, 8]


def test_wrong_columns_names_expected_and_found(images):
    pd.DataFrame({"file": ["im0.png"], "score": [1]}).to_csv(images / "r.csv", index=False)
    with pytest.raises(HarnessError, match=r"expected \['image', 'rating'\].*found \['file', 'score'\]"):
        read_ratings(images / "r.csv")


def test_rating_outside_scale_names_row_and_scale(images):
    pd.DataFrame({"image": ["im0.png", "im1.png"], "rating": [2, 7]}).to_csv(images / "r.csv", index=False)
    with pytest.raises(HarnessError, match=r"row 2 = 7.*outside the declared scale 0..5"):
        read_ratings(images / "r.csv")
    assert read_ratings(images / "r.csv", scale=(0, 10))["rating"].tolist() == [2.0, 7.0]


def test_non_numeric_rating_is_refused(images):
    pd.DataFrame({"image": ["im0.png"], "rating": ["bad"]}).to_csv(images / "r.csv", index=False)
    with pytest.raises(HarnessError, match="'bad' is outside"):
        read_ratings(images / "r.csv")


def test_missing_image_files(images):
    pd.DataFrame({"image": ["im0.png", "nope.png"], "rating": [1, 2]}).to_csv(images / "r.csv", index=False)
    with pytest.raises(HarnessError, match=r"1 image file\(s\) not found, e.g. .*nope.png"):
        read_ratings(images / "r.csv")
    df = read_ratings(images / "r.csv", missing="drop")
    assert [p.endswith("im0.png") for p in df["image"]] == [True]


def test_duplicate_rows(images):
    t = images / "r.csv"
    pd.DataFrame({"image": ["im0.png", "im0.png", "im1.png"], "rating": [1, 1, 2]}).to_csv(t, index=False)
    assert read_ratings(t)["rating"].tolist() == [1.0, 2.0]  # exact repeats collapse
    pd.DataFrame({"image": ["im0.png", "im0.png", "im0.png"], "rating": [1, 2, 4]}).to_csv(t, index=False)
    with pytest.raises(HarnessError, match=r"'im0.png' appears with different ratings \[1, 2, 4\]"):
        read_ratings(t)
    assert read_ratings(t, duplicates="median")["rating"].tolist() == [2.0]


def _horde_rows():
    # img a: 4 real raters (median 1) + an anonymous 5 + rater u1's earlier vote 5 (superseded by 1).
    rows = [("a", "u1", 5, 10, 1), ("a", "u1", 1, 10, 5), ("a", "u2", 1, 10, 2), ("a", "u3", 2, 10, 3),
            ("a", "anon", 5, -50, 4), ("a", "anon2", 5, -50, 4), ("a", "anon3", 5, -50, 4),
            # img b: only 2 distinct known raters -> dropped at min_ratings=3 (u4 voted three times).
            ("b", "u4", 3, 10, 1), ("b", "u4", 3, 10, 2), ("b", "u4", 3, 10, 3), ("b", "u5", 4, 10, 1),
            ("c", "u1", 0, 10, 1), ("c", "u2", 0, 10, 1), ("c", "u3", 1, 10, 1)]
    return pd.DataFrame([{"image_uuid": i, "user_id": u, "artifacts": a, "kudos": k, "created_at": c,
                          "rating": 7, "ratings_count": 3} for i, u, a, k, c in rows])


def test_ai_horde_filters_apply_before_the_groupby(tmp_path):
    for name in ("a", "b", "c"):
        _img(tmp_path / f"{name}.webp")
    _horde_rows().to_parquet(tmp_path / "diffusiondb_export.parquet")
    df = read_ratings(tmp_path / "diffusiondb_export.parquet")
    got = dict(zip([p.rsplit("/", 1)[1] for p in df["image"]], df["rating"]))
    # Unfiltered, 'a' would have 7 ratings with median 5 and 'b' 4 ratings: the filters must stick.
    assert got == {"a.webp": 1.0, "c.webp": 0.0}
    assert df.set_index("rating")["n_ratings"].to_dict() == {1.0: 3, 0.0: 3}
    kept = read_ratings(tmp_path / "diffusiondb_export.parquet", drop_anonymous=False)
    assert dict(zip(kept["rating"], kept["n_ratings"])) == {3.5: 6, 0.0: 3}  # [1, 1, 2, 5, 5, 5]


def test_ai_horde_with_diffusiondb_metadata(tmp_path):
    (tmp_path / "part-000003").mkdir()
    for name in ("a", "c"):
        _img(tmp_path / "part-000003" / f"{name}.png")
    _horde_rows().to_parquet(tmp_path / "ratings.parquet")
    pd.DataFrame({"image_name": ["a.png", "c.png"], "part_id": [3, 3], "prompt": ["cat", "dog"],
                  "seed": [11, 12], "step": [50, 50], "cfg": [7.0, 7.0]}).to_parquet(tmp_path / "metadata.parquet")
    df = read_ratings(tmp_path / "ratings.parquet", metadata=tmp_path / "metadata.parquet")
    assert sorted(zip(df["prompt"], df["seed"], df["rating"])) == [("cat", 11, 1.0), ("dog", 12, 0.0)]
    assert all("/part-000003/" in p for p in df["image"])


def test_ai_horde_artifacts_outside_scale(tmp_path):
    rows = _horde_rows()
    rows.loc[3, "artifacts"] = 6
    rows.to_parquet(tmp_path / "r.parquet")
    with pytest.raises(HarnessError, match=r"column 'artifacts' row 4 = 6"):
        read_ratings(tmp_path / "r.parquet")


def test_unknown_format_and_missing_table(tmp_path):
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(HarnessError, match="unknown table format '.txt'"):
        read_ratings(tmp_path / "r.txt")
    with pytest.raises(HarnessError, match="ratings table not found"):
        read_ratings(tmp_path / "none.csv")


# --- planted artifacts ---------------------------------------------------------------------------

def test_planted_severity_is_graded():
    rng = np.random.default_rng(0)
    base = art.random_crop(art.photo("astronaut"), rng, 96)
    assert np.array_equal(art.plant(base, 0, rng), base)
    for kind in art.ARTIFACTS:
        dist = [np.abs(art.plant(base, s, np.random.default_rng(1), kinds=[kind]).astype(float) - base).mean()
                for s in (1, 3, 5)]
        assert dist[0] > 0 and dist[0] < dist[2], (kind, dist)


def test_plant_rejects_bad_input():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(HarnessError, match="severity: expected 0..5, got 6"):
        art.plant(img, 6, np.random.default_rng(0))
    with pytest.raises(HarnessError, match="unknown \\['glitter'\\]"):
        art.plant(img, 1, np.random.default_rng(0), kinds=["glitter"])
    with pytest.raises(HarnessError, match="expected uint8 HxWx3"):
        art.plant(np.zeros((8, 8), np.uint8), 1, np.random.default_rng(0))


def test_labelled_set_is_balanced_and_readable(tmp_path):
    table = art.make_labelled_set(tmp_path, 12, seed=3, long_side=48, photos=("coffee", "camera"))
    df = read_ratings(table)
    assert sorted(df["rating"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert set(df["group"]) == {"coffee", "camera"}
    assert all(max(Image.open(p).size) == 48 for p in df["image"])


# --- math ----------------------------------------------------------------------------------------

def test_correlations_match_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.integers(0, 6, 50).astype(float)  # ties in b
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-9)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-9)
    assert pearson(np.ones(5), np.arange(5.0)) == 0.0  # a constant predictor shows no relation
    assert within(np.array([1.0, 2.0, 3.0]), np.array([1.4, 2.6, 3.0])) == pytest.approx(2 / 3)


def test_collapse_detector_logic():
    target = np.repeat(np.arange(6.0), 10)
    ts = np.zeros(60, int)
    good = evaluate(target + np.random.default_rng(0).normal(0, 0.3, 60), target, ts, 2.5)
    assert beats_baseline(good, 0.1, 0.3)[0]
    mean_only = evaluate(np.full(60, 2.5), target, ts, 2.5)
    ok, why = beats_baseline(mean_only, 0.1, 0.3)
    assert not ok and "Spearman 0.000" in why
    constant = evaluate(np.full(60, 2.0), np.full(60, 2.0), ts, 2.0)
    assert not beats_baseline(constant, 0.1, 0.3)[0]  # baseline MAE 0 cannot be beaten


def test_class_weights_balance_levels():
    r = torch.tensor([0.0] * 8 + [5.0] * 2 + [2.5] * 2)
    w = class_weights(r, (0.0, 1.0, 2.0, 3.0, 4.0, 5.0))
    assert w[:8].sum() == pytest.approx(w[8:10].sum()) and w.mean() == pytest.approx(1.0)


def test_split_keeps_groups_whole():
    groups = [f"g{i % 7}" for i in range(70)]
    held = split_groups(groups, 0.3, seed=1)
    for g in set(groups):
        side = {h for h, gg in zip(held, groups) if gg == g}
        assert len(side) == 1
    assert 0 < held.sum() < 70
    with pytest.raises(HarnessError, match="at least 2 image groups"):
        split_groups(["a"] * 5, 0.2, 0)


def test_warmup_is_shorter_than_the_run():
    f = lr_lambda(10, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(99) < 0.1


def test_bootstrap_ci():
    v = np.random.default_rng(0).normal(2.0, 1.0, 400)
    lo, hi = bootstrap_ci(v, 500, 0.05, seed=0)
    assert lo < v.mean() < hi and hi - lo < 0.3
    assert bootstrap_ci(v, 500, 0.05, seed=0) == (lo, hi)
    lo2, hi2 = bootstrap_ci(v[:40], 500, 0.05, seed=0)
    assert hi2 - lo2 > hi - lo
    with pytest.raises(HarnessError, match="alpha"):
        bootstrap_ci(v, 10, 1.5)


# --- preprocessing -------------------------------------------------------------------------------

def test_letterbox_pads_instead_of_squashing():
    x = torch.rand(1, 3, 10, 20)
    out = letterbox(x, 16)
    assert out.shape == (1, 3, 16, 16)
    assert torch.all(out[..., :4, :] == 0.5) and torch.all(out[..., 12:, :] == 0.5)  # 16x8 content
    assert not torch.all(out[..., 4:12, :] == 0.5)


def test_noise_is_seeded_per_sample():
    from harness.estimator.dataset import load_noise_scheduler

    sched = load_noise_scheduler(None)
    z = torch.zeros(1, 4, 2, 2)
    a = noised(sched, z, 500, noise_seed(0, 3, 500, 1))
    assert torch.equal(a, noised(sched, z, 500, noise_seed(0, 3, 500, 1)))
    assert not torch.equal(a, noised(sched, z, 500, noise_seed(0, 3, 500, 0)))
    assert torch.equal(noised(sched, z + 1, 0, 5), z + 1)


def test_parse_timesteps():
    assert parse_timesteps("0:1000:250") == [0, 250, 500, 750]
    assert parse_timesteps("500, 0") == [0, 500]
    with pytest.raises(HarnessError, match="expected values in 0..999"):
        parse_timesteps("0,1000")
    with pytest.raises(HarnessError, match="timesteps: expected"):
        parse_timesteps("a,b")


def test_latent_to_rgb_uses_the_sd_factors():
    from harness.models.preview import latent_to_rgb

    z = torch.zeros(1, 4, 1, 1)
    z[0, 0] = 1.0
    assert torch.allclose(latent_to_rgb(z)[0, :, 0, 0], (torch.tensor([0.298, 0.207, 0.208]) + 1) / 2)
