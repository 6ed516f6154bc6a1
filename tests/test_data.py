"""Dataset stage: folder format, safe image decoding, splits, loader, bucketing, stats, CLI."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from _data_helpers import exif_rotated_jpeg, photo, pixel, png_bytes, write_hostile, write_photos
from PIL import Image

from harness.cli import main
from harness.data.buckets import BucketBatchSampler, make_buckets, nearest_bucket
from harness.data.folder import read_caption_file, scan_dataset, update_metadata
from harness.data.images import image_size, open_rgb
from harness.data.loader import ImageCaptionDataset, process_caption
from harness.data.split import split_dataset
from harness.data.split_rule import assign_split
from harness.data.stats import dataset_stats
from harness.errors import HarnessError

# ---------------------------------------------------------------- images


def test_open_rgb_real_photo_roundtrip(tmp_path):
    src = photo("astronaut", (40, 30))
    src.save(tmp_path / "a.png")
    img = open_rgb(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (40, 30)
    assert np.array_equal(np.asarray(img), np.asarray(src))


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("case", ["RGBA", "LA", "P_transparent", "P", "L", "1", "CMYK", "I;16", "I", "F", "gif"])
def test_open_rgb_converts_every_mode(tmp_path, case):
    if case == "RGBA":
        img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white background
        path, expect = _save(img, tmp_path / "x.png"), (255, 255, 255)
    elif case == "LA":
        path, expect = _save(Image.new("LA", (4, 4), (0, 255)), tmp_path / "x.png"), (0, 0, 0)
    elif case == "P_transparent":
        img = Image.new("P", (4, 4), 1)
        img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
        img.info["transparency"] = 1
        path, expect = _save(img, tmp_path / "x.png", transparency=1), (255, 255, 255)
    elif case == "P":
        img = Image.new("P", (4, 4), 1)
        img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
        path, expect = _save(img, tmp_path / "x.png"), (0, 0, 255)
    elif case == "L":
        path, expect = _save(Image.new("L", (4, 4), 100), tmp_path / "x.png"), (100, 100, 100)
    elif case == "1":
        path, expect = _save(Image.new("1", (4, 4), 1), tmp_path / "x.png"), (255, 255, 255)
    elif case == "CMYK":
        path, expect = _save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path / "x.jpg", quality=100), (255, 255, 255)
    elif case == "I;16":
        arr = np.full((4, 4), 32896, dtype=np.uint16)  # 32896 / 65535 * 255 = 128
        path, expect = _save(Image.fromarray(arr), tmp_path / "x.png"), (128, 128, 128)
    elif case == "I":
        path, expect = _save(Image.fromarray(np.full((4, 4), 65535, dtype=np.int32), "I"), tmp_path / "x.tif"), \
            (255, 255, 255)
    elif case == "F":
        path, expect = _save(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), "F"), tmp_path / "x.tif"), \
            (128, 128, 128)
    else:  # animated GIF: first frame is red, second blue
        frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
        path = tmp_path / "x.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        expect = (255, 0, 0)
    img = open_rgb(path)
    assert img.mode == "RGB"
    got = pixel(img, (1, 1))
    assert all(abs(a - b) <= 2 for a, b in zip(got, expect)), (case, got, expect)


def test_open_rgb_applies_exif_orientation(tmp_path):
    stored = exif_rotated_jpeg(tmp_path / "r.jpg", orientation=6)  # 48x24 stored, displayed rotated 90 deg
    assert stored.size == (48, 24)
    assert image_size(tmp_path / "r.jpg") == (24, 48)
    img = open_rgb(tmp_path / "r.jpg")
    assert img.size == (24, 48)
    expected = np.asarray(stored.transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(np.asarray(img).astype(int) - expected).mean() < 8


def test_open_rgb_refuses_above_max_pixels_naming_path_and_limit(tmp_path):
    photo("coffee", (64, 64)).save(tmp_path / "big.png")
    with pytest.raises(HarnessError, match=r"big\.png: refused: 64x64 = 4,096 pixels is above the limit of 1,000"):
        open_rgb(tmp_path / "big.png", max_pixels=1000)
    (tmp_path / "bomb.png").write_bytes(png_bytes(100_000, 100_000))
    with pytest.raises(HarnessError, match=r"bomb\.png: refused: 10,000,000,000 pixels is above the limit of 64,000,000"):
        open_rgb(tmp_path / "bomb.png")


@pytest.mark.parametrize("content,reason", [("empty", "empty file"), ("truncated", "truncated"),
                                            ("text", "not an image")])
def test_open_rgb_bad_bytes_one_line_error(tmp_path, content, reason):
    photo("rocket", (64, 64)).save(tmp_path / "good.png")
    good = (tmp_path / "good.png").read_bytes()
    data = {"empty": b"", "truncated": good[: len(good) * 2 // 3], "text": b"hello world"}[content]
    (tmp_path / "x.png").write_bytes(data)
    with pytest.raises(HarnessError, match=reason) as e:
        open_rgb(tmp_path / "x.png")
    assert "\n" not in str(e.value) and str(tmp_path / "x.png") in str(e.value)


# ---------------------------------------------------------------- folder scanning


def test_scan_sidecars_and_metadata_with_extra_columns(tmp_path):
    write_photos(tmp_path, ["astronaut", "chelsea", "coffee"])
    (tmp_path / "astronaut.txt").write_text("\ufeffan astronaut,\n smiling \n")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "chelsea.png", "text": "a  cat", "split": "validation", "source": "skimage"}) + "\n")
    index = scan_dataset(tmp_path)
    by = {it.rel: it for it in index.items}
    assert set(by) == {"astronaut.png", "chelsea.png", "coffee.png"} and not index.skipped
    assert by["astronaut.png"].caption == "an astronaut, smiling" and by["astronaut.png"].caption_source == "txt"
    assert by["chelsea.png"].caption == "a cat" and by["chelsea.png"].split == "val"
    assert by["chelsea.png"].extra == {"source": "skimage"} and by["chelsea.png"].size == (48, 32)
    assert by["coffee.png"].caption is None and by["coffee.png"].split is None
    assert [it.rel for it in scan_dataset(tmp_path, require_captions=True).items] == ["astronaut.png", "chelsea.png"]
    assert [it.rel for it in scan_dataset(tmp_path, split="val").items] == ["chelsea.png"]
    assert {it.rel for it in scan_dataset(tmp_path, split="train").items} == {"astronaut.png", "coffee.png"}


def test_scan_train_val_folders_imagefolder_layout(tmp_path):
    write_photos(tmp_path / "train", ["astronaut", "chelsea"])
    write_photos(tmp_path / "validation", ["coffee"])
    (tmp_path / "validation" / "metadata.jsonl").write_text(json.dumps({"file_name": "coffee.png", "text": "cup"}))
    index = scan_dataset(tmp_path)
    assert {(it.rel, it.split) for it in index.items} == {
        ("train/astronaut.png", "train"), ("train/chelsea.png", "train"), ("validation/coffee.png", "val")}
    assert [it.caption for it in scan_dataset(tmp_path, split="val").items] == ["cup"]


def test_scan_counts_every_hostile_input_and_reads_nothing_outside(tmp_path):
    root = tmp_path / "ds"
    expected = write_hostile(root, tmp_path / "outside")
    write_photos(root, ["astronaut"], ext=".jpg")
    index = scan_dataset(root)
    assert [it.rel for it in index.items] == ["astronaut.jpg"]
    reasons = {os.path.relpath(str(p), root): why for p, why in index.skipped}
    for name, fragment in expected.items():
        assert name in reasons, (name, reasons)
        assert fragment in reasons[name], (name, reasons[name])
    assert len(index.skipped) == len(expected)
    assert all(not str(p).startswith(str(tmp_path / "outside")) for p, _ in index.skipped)


def test_scan_refuses_caption_symlink_escaping(tmp_path):
    root = tmp_path / "ds"
    write_photos(root, ["coffee"])
    (tmp_path / "secret.txt").write_text("password")
    os.symlink(tmp_path / "secret.txt", root / "coffee.txt")
    index = scan_dataset(root)
    assert not index.items and "outside the dataset" in index.skipped[0][1]


def test_scan_errors_name_the_argument(tmp_path):
    with pytest.raises(HarnessError, match="dataset folder not found"):
        scan_dataset(tmp_path / "nope")
    with pytest.raises(HarnessError, match="split: expected 'train', 'val'"):
        scan_dataset(tmp_path, split="dev")


def test_read_caption_file_limits(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"x" * 101)
    with pytest.raises(HarnessError, match="larger than 100 bytes"):
        read_caption_file(tmp_path / "c.txt", max_bytes=100)
    (tmp_path / "d.txt").write_bytes(b"ok \xc3\x28")
    with pytest.raises(HarnessError, match=r"not UTF-8 \(byte 0xc3 at offset 3\)"):
        read_caption_file(tmp_path / "d.txt")


# ---------------------------------------------------------------- split


def test_assign_split_fraction_determinism_and_seed():
    keys = [f"img_{i:05d}.jpg" for i in range(4000)]
    a = [assign_split(k, 0.1, 0) for k in keys]
    assert a == [assign_split(k, 0.1, 0) for k in keys]
    assert 0.08 < a.count("val") / len(a) < 0.12
    assert a != [assign_split(k, 0.1, 1) for k in keys]
    # Growing the fraction only moves images train -> val, never back.
    b = [assign_split(k, 0.2, 0) for k in keys]
    assert all(y == "val" for x, y in zip(a, b) if x == "val")
    with pytest.raises(HarnessError, match=r"val_fraction: expected a number in \[0, 1\), got 1.5"):
        assign_split("x", 1.5, 0)


def test_split_dataset_keeps_captions_and_bad_lines_and_is_stable_when_images_are_added(tmp_path):
    write_photos(tmp_path, ["astronaut", "chelsea", "coffee", "rocket"])
    (tmp_path / "rocket.txt").write_text("a rocket")
    meta_lines = [json.dumps({"file_name": "astronaut.png", "text": "astronaut ünïcode", "who": "nasa"}),
                  "{not json at all", json.dumps({"file_name": "chelsea.png", "text": "cat", "split": "train"})]
    (tmp_path / "metadata.jsonl").write_text("\n".join(meta_lines) + "\n", encoding="utf-8")
    before = (tmp_path / "metadata.jsonl").read_bytes()
    dry = split_dataset(tmp_path, val=0.5, seed=3, dry_run=True)
    assert (tmp_path / "metadata.jsonl").read_bytes() == before and dry.assigned
    report = split_dataset(tmp_path, val=0.5, seed=3)
    assert report.kept == 1 and len(report.assigned) == 3
    lines = (tmp_path / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines[1] == "{not json at all" and lines[2] == meta_lines[2]
    rows = {json.loads(x)["file_name"]: json.loads(x) for x in lines if x.startswith("{\"")}
    assert rows["astronaut.png"]["text"] == "astronaut ünïcode" and rows["astronaut.png"]["who"] == "nasa"
    assert "text" not in rows["rocket.png"]  # sidecar captions stay in their sidecars
    index = scan_dataset(tmp_path)
    assert {it.rel: it.caption for it in index.items}["rocket.png"] == "a rocket"
    first = {it.rel: it.split for it in index.items}
    assert first == {k: (rows[k]["split"]) for k in first}
    # Add images: nothing already assigned moves; a second run over the same folder changes nothing.
    write_photos(tmp_path / "more", ["astronaut", "coffee"])
    again = split_dataset(tmp_path, val=0.5, seed=3)
    assert sorted(r for r, _ in again.assigned) == ["more/astronaut.png", "more/coffee.png"]
    second = {it.rel: it.split for it in scan_dataset(tmp_path).items}
    assert all(second[k] == v for k, v in first.items())
    assert split_dataset(tmp_path, val=0.5, seed=3).files == {}


def test_update_metadata_refuses_symlinked_root_metadata(tmp_path):
    write_photos(tmp_path / "ds", ["coffee"])
    (tmp_path / "elsewhere.jsonl").write_text("")
    os.symlink(tmp_path / "elsewhere.jsonl", tmp_path / "ds" / "metadata.jsonl")
    with pytest.raises(HarnessError, match="symlink"):
        update_metadata(tmp_path / "ds", {tmp_path / "ds" / "coffee.png": {"split": "val"}})
    assert (tmp_path / "elsewhere.jsonl").read_text() == ""


def test_scan_val_fraction_matches_split_command(tmp_path):
    write_photos(tmp_path, ["astronaut", "chelsea", "coffee", "rocket"])
    on_the_fly = {it.rel: it.split for it in scan_dataset(tmp_path, val_fraction=0.5, split_seed=7).items}
    split_dataset(tmp_path, val=0.5, seed=7)
    assert {it.rel: it.split for it in scan_dataset(tmp_path).items} == on_the_fly


# ---------------------------------------------------------------- loader


@pytest.fixture()
def photo_index(tmp_path):
    write_photos(tmp_path, ["astronaut", "chelsea", "coffee", "rocket"], size=(60, 40))
    for name in ("astronaut", "chelsea"):
        (tmp_path / f"{name}.txt").write_text(f"{name}, photo, outdoor, sharp")
    return scan_dataset(tmp_path)


def test_loader_item_shapes_range_and_centre_crop(photo_index):
    ds = ImageCaptionDataset(photo_index, resolution=32)
    item = ds[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert item["caption"] == "astronaut, photo, outdoor, sharp"
    # 60x40 -> cover 32x32 = 48x32, centre crop starts at x=8; the box in original pixels is (10, 0, 50, 40)
    assert item["crop_top_left"].tolist() == [0, 8] and item["crop"].tolist() == [10, 0, 50, 40]
    assert item["original_size"].tolist() == [40, 60] and item["target_size"].tolist() == [32, 32]
    ref = Image.open(photo_index.items[0].path).convert("RGB").resize((48, 32), Image.Resampling.BICUBIC)
    ref = torch.from_numpy(np.asarray(ref.crop((8, 0, 40, 32))).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(item["pixel_values"], ref)


def test_loader_rectangular_resolution_and_filter(photo_index):
    ds = ImageCaptionDataset(photo_index, resolution=(40, 24), resize_filter="lanczos")
    assert ds[1]["pixel_values"].shape == (3, 24, 40)
    assert ds[1]["key"] != ImageCaptionDataset(photo_index, resolution=(40, 24))[1]["key"]
    with pytest.raises(HarnessError, match="resize_filter: unknown 'cubic'; known: bicubic"):
        ImageCaptionDataset(photo_index, resolution=32, resize_filter="cubic")
    with pytest.raises(HarnessError, match="resolution: expected an int or"):
        ImageCaptionDataset(photo_index, resolution="big")
    with pytest.raises(HarnessError, match=r"flip_p: expected a probability in \[0, 1\], got 2"):
        ImageCaptionDataset(photo_index, resolution=32, flip_p=2)


def test_loader_random_crop_flip_deterministic_per_epoch(photo_index):
    ds = ImageCaptionDataset(photo_index, resolution=32, random_crop=True, flip_p=0.5, seed=5)
    crops0 = [(ds[i]["crop_top_left"].tolist(), ds[i]["flipped"]) for i in range(4)]
    assert crops0 == [(ds[i]["crop_top_left"].tolist(), ds[i]["flipped"]) for i in range(4)]
    keys = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        keys |= {ds[0]["key"]}
    assert len(keys) > 1  # crop/flip change the pixels, so they change the cache key


def test_loader_flip_is_a_mirror_and_key_is_content_hash(photo_index, tmp_path):
    plain = ImageCaptionDataset(photo_index, resolution=32)[2]
    flipped = ImageCaptionDataset(photo_index, resolution=32, flip_p=1.0)[2]
    assert flipped["flipped"] and torch.equal(flipped["pixel_values"], plain["pixel_values"].flip(-1))
    assert flipped["key"] != plain["key"] and flipped["image_sha256"] == plain["image_sha256"]
    # The same bytes under another name give the same key: the cache is keyed on content, not path.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "x.png").write_bytes(photo_index.items[2].path.read_bytes())
    assert ImageCaptionDataset(scan_dataset(copy), resolution=32)[0]["key"] == plain["key"]


def test_loader_honours_exif_and_odd_modes(tmp_path):
    exif_rotated_jpeg(tmp_path / "r.jpg")
    Image.new("RGBA", (20, 30), (0, 0, 0, 0)).save(tmp_path / "t.png")
    Image.fromarray(np.full((30, 20), 65535, np.uint16)).save(tmp_path / "w16.png")
    Image.new("CMYK", (30, 20), (0, 0, 0, 255)).save(tmp_path / "k.jpg")
    ds = ImageCaptionDataset(scan_dataset(tmp_path), resolution=16)
    got = {os.path.basename(ds[i]["path"]): ds[i] for i in range(len(ds))}
    assert got["r.jpg"]["original_size"].tolist() == [48, 24]  # (height, width) after rotation
    assert torch.allclose(got["t.png"]["pixel_values"], torch.ones(3, 16, 16))  # transparent -> white
    assert torch.allclose(got["w16.png"]["pixel_values"], torch.ones(3, 16, 16))  # 16-bit white stays white
    assert got["k.jpg"]["pixel_values"].max() < -0.9  # CMYK black


def test_process_caption_tag_shuffle_and_dropout():
    cap = "sks dog, red, blue, green, yellow, pink"
    outs = {process_caption(cap, shuffle_tags_after=1, rng=random.Random(s)) for s in range(20)}
    assert len(outs) > 1 and all(o.startswith("sks dog, ") for o in outs)
    assert all(sorted(o.split(", ")) == sorted(cap.split(", ")) for o in outs)
    assert process_caption(cap, caption_dropout=1.0) == ""
    assert process_caption(cap, caption_dropout=0.0) == cap
    dropped = sum(process_caption(cap, caption_dropout=0.3, rng=random.Random(s)) == "" for s in range(1000))
    assert 240 < dropped < 360
    assert process_caption(None) == ""


# ---------------------------------------------------------------- buckets


def test_make_buckets_properties():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and len(buckets) == len(set(buckets)) >= 5
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2.0
        assert w * h >= 0.75 * 512 * 512  # about the same pixel count
    assert nearest_bucket((3000, 2000), buckets) == (576, 448) or nearest_bucket((3000, 2000), buckets)[0] > 512
    assert nearest_bucket((1000, 2000), buckets)[1] > nearest_bucket((1000, 2000), buckets)[0]
    with pytest.raises(HarnessError, match="base_resolution: expected a multiple of step=64, got 500"):
        make_buckets(500)


def test_bucket_sampler_one_bucket_per_batch_covers_all_deterministic():
    rng = random.Random(0)
    sizes = [rng.choice([(64, 64), (64, 32), (32, 64)]) for _ in range(103)]
    s = BucketBatchSampler(sizes, batch_size=4, seed=1)
    batches = list(s)
    assert len(batches) == len(s)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert all(len({sizes[i] for i in b}) == 1 for b in batches)
    assert batches == list(BucketBatchSampler(sizes, batch_size=4, seed=1))
    s.set_epoch(1)
    assert list(s) != batches
    dropped = list(BucketBatchSampler(sizes, 4, seed=1, drop_last=True))
    assert all(len(b) == 4 for b in dropped)


def test_bucket_sampler_shards_disjoint_across_ranks():
    sizes = [(64, 64)] * 50 + [(64, 32)] * 30
    shards = [list(BucketBatchSampler(sizes, 4, seed=2, drop_last=True, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(BucketBatchSampler(sizes, 4, 2, True, 3, 0))
    seen = [set(i for b in s for i in b) for s in shards]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    padded = [list(BucketBatchSampler(sizes[:5], 4, seed=2, num_replicas=4, rank=r)) for r in range(4)]
    assert all(len(p) == 1 for p in padded)  # every rank gets a batch even with fewer batches than ranks
    with pytest.raises(HarnessError, match="rank: expected 0 <= rank < num_replicas=2, got 2"):
        BucketBatchSampler(sizes, 4, num_replicas=2, rank=2)


def test_bucketed_dataloader_stacks_batches(tmp_path):
    write_photos(tmp_path, ["astronaut", "chelsea"], size=(80, 40))
    write_photos(tmp_path / "tall", ["coffee", "rocket"], size=(40, 80))
    ds = ImageCaptionDataset(scan_dataset(tmp_path), resolution=64, buckets=make_buckets(64, step=16))
    assert len(set(ds.target_sizes)) == 2
    loader = torch.utils.data.DataLoader(ds, batch_sampler=BucketBatchSampler(ds.target_sizes, 2, seed=0))
    shapes = sorted(tuple(b["pixel_values"].shape) for b in loader)
    assert len(shapes) == 2 and shapes[0][2:] != shapes[1][2:]
    assert all(s[2] * s[3] <= 64 * 64 for s in shapes)


# ---------------------------------------------------------------- stats and CLI


def test_dataset_stats_and_cli(tmp_path, capsys):
    root = tmp_path / "ds"
    write_photos(root, ["astronaut", "chelsea"], size=(60, 40))
    (root / "astronaut.txt").write_text("one two three")
    (root / "zero.jpg").write_bytes(b"")
    stats = dataset_stats(root)
    assert stats["images"] == 2 and stats["captioned"] == 1 and stats["uncaptioned"] == 1
    assert stats["caption_words"]["max"] == 3 and stats["aspect"]["4:3 - 2:1"] == 2
    assert stats["skipped"] == [(str(root / "zero.jpg"), "empty file (0 bytes)")]
    assert main(["data", "stats", str(root)]) == 0
    out = capsys.readouterr().out
    assert "images: 2" in out and "zero.jpg: empty file" in out
    assert main(["split", str(root), "--val", "0.5", "--seed", "1", "--dry-run"]) == 0
    assert not (root / "metadata.jsonl").exists()
    assert main(["split", str(root), "--val", "0.5", "--seed", "1"]) == 0
    assert len((root / "metadata.jsonl").read_text().splitlines()) == 2
    assert main(["split", str(root), "--val", "2"]) == 2
    assert "val_fraction: expected a number in [0, 1)" in capsys.readouterr().err


def test_open_rgb_unaffected_by_ultralytics_pil_patch(tmp_path, monkeypatch):
    import ultralytics.utils.patches as patches  # replaces PIL.Image.open with a pip-installing wrapper

    tried = []
    monkeypatch.setattr("ultralytics.utils.checks.check_requirements", lambda *a, **k: tried.append(a))
    assert Image.open is patches.image_open
    (tmp_path / "junk.jpg").write_text("not an image")
    with pytest.raises(HarnessError, match="junk.jpg: not an image PIL can identify"):
        open_rgb(tmp_path / "junk.jpg")
    assert not tried


def test_stats_cli_on_hostile_folder_lists_every_bad_file(tmp_path, capsys):
    root = tmp_path / "ds"
    expected = write_hostile(root, tmp_path / "outside")
    write_photos(root, ["rocket"])
    assert main(["data", "stats", str(root)]) == 0
    out = capsys.readouterr().out
    assert "images: 1 " in out and f"unreadable/skipped: {len(expected)}" in out
    assert all(fragment in out for fragment in expected.values())
