"""The hostile corpus (tests/data/make_bad_corpus.py) through every reader: scan, loader, stats CLI,
captioner. Each file gets its EXPECTED outcome (loads, or a counted skip with a reason); nothing
crashes; nothing outside the dataset folder is opened, written or leaked into outputs."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from _rel_helpers import PASSWD_MARK, bad_corpus, outside, run_cli, snapshot, watch_opens

from harness.caption.blip import caption_folder, load_captioner
from harness.data.folder import Item, scan_dataset
from harness.data.loader import ImageCaptionDataset
from harness.errors import HarnessError

CORPUS = bad_corpus()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    ds = CORPUS.make_corpus(root / "ds")
    expected = dict(CORPUS.EXPECTED)
    return root, ds, expected


def _names(paths) -> set[str]:
    return {os.path.basename(str(p)) for p in paths}


def _check_outcomes(items, skipped, expected):
    ok = {n for n, e in expected.items() if e == "ok"}
    skip = {n for n, e in expected.items() if e == "skip"}
    got_items, got_skipped = _names(items), _names(skipped)
    assert ok <= got_items, ok - got_items
    assert skip <= got_skipped, skip - got_skipped
    assert not (skip & got_items) and not (ok & got_skipped)
    either = {n for n, e in expected.items() if e == "ok_or_skip"}
    assert either <= got_items | got_skipped  # decided, not silently dropped


def test_scan_gives_every_file_its_expected_outcome_and_reads_nothing_outside(corpus):
    root, ds, expected = corpus
    with watch_opens() as opened:
        index = scan_dataset(ds)
    _check_outcomes([it.path for it in index.items], [p for p, _ in index.skipped], expected)
    reasons = {os.path.basename(str(p)): why for p, why in index.skipped}
    assert "outside the dataset" in reasons["escape.png"] and "loop" in reasons["loop_a.png"]
    assert "not UTF-8" in reasons["latin1_caption.png"]
    assert all("\n" not in why and why for why in reasons.values())  # one line each
    assert "/etc/passwd" not in opened
    assert not outside(opened, [ds], root)


def test_metadata_traversal_and_absolute_paths_are_refused(tmp_path):
    ds = CORPUS.make_metadata_corpus(tmp_path / "meta")
    deep = "../" * 40 + "etc/passwd"  # enough '..' to reach the real /etc/passwd from any tmp dir
    with open(ds / "metadata.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"file_name": deep, "text": "deep traversal"}) + "\n")
        f.write(json.dumps({"file_name": "sub/../../meta/good.png", "text": "sneaky but inside"}) + "\n")
    with watch_opens() as opened:
        index = scan_dataset(ds)
    assert [it.rel for it in index.items] == ["good.png"]
    assert index.items[0].caption == "sneaky but inside"  # the later row for the same file wins
    reasons = {str(p).rsplit(":", 1)[-1]: why for p, why in index.skipped}
    # lines 2..7 of the corpus and the deep traversal: each a counted skip naming why
    assert set(reasons) == {"2", "3", "4", "5", "6", "7", "8"}
    assert "outside the dataset" in reasons["2"] and "absolute" in reasons["3"] and "no such file" in reasons["4"]
    assert "not valid JSON" in reasons["5"] and "file_name missing" in reasons["6"]
    assert "not a JSON object" in reasons["7"] and "outside the dataset" in reasons["8"]
    assert "/etc/passwd" not in opened and not outside(opened, [ds], tmp_path)


def test_loader_decodes_every_kept_file_and_fails_one_line_on_the_rest(corpus):
    root, ds, expected = corpus
    index = scan_dataset(ds)
    data = ImageCaptionDataset(index, resolution=32)
    for i in range(len(data)):
        x = data[i]["pixel_values"]
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    # files that changed after the scan (here: regular files the scan refused) still fail cleanly
    bad = [Item(path=ds / n, caption="x") for n, e in expected.items()
           if e == "skip" and not (ds / n).is_symlink() and (ds / n).is_file()]
    assert len(bad) >= 5
    forced = ImageCaptionDataset(type(index)(root=ds, items=bad, skipped=[]), resolution=32)
    for i, item in enumerate(bad):
        if item.path.name == "latin1_caption.png":
            continue  # the image itself is fine; only its caption was refused
        with pytest.raises(HarnessError) as e:
            forced[i]
        assert item.path.name in str(e.value) and "\n" not in str(e.value)


def test_stats_cli_counts_every_skip_without_traceback(corpus):
    root, ds, expected = corpus
    before = snapshot(root)
    proc = run_cli(["data", "stats", ds, "--json"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    stats = json.loads(proc.stdout)
    skipped = _names(p for p, _ in stats["skipped"])
    assert {n for n, e in expected.items() if e == "skip"} <= skipped
    assert stats["images"] == len(expected) - len(skipped & set(expected))
    assert PASSWD_MARK not in proc.stdout + proc.stderr
    assert snapshot(root) == before  # stats writes nothing


def test_caption_hostile_corpus_captions_only_good_files_writes_only_sidecars(zoo_dir, tmp_path):
    root = tmp_path
    ds = CORPUS.make_corpus(root / "ds")
    expected = dict(CORPUS.EXPECTED)
    todo = ["good.png", "cmyk.jpg", "gray16.png", "palette_transparent.png", "rgba.png"]
    for n in todo:
        (ds / n).with_suffix(".txt").unlink()
    meta = CORPUS.make_metadata_corpus(root / "meta")
    shutil.copy(ds / "good.png", meta / "uncaptioned.png")
    before, before_ds = snapshot(root, exclude=ds), snapshot(ds)
    before_meta = (meta / "metadata.jsonl").read_bytes()
    model, processor = load_captioner(zoo_dir / "blip", device="cpu")
    with watch_opens() as opened:
        s = caption_folder(ds, model=model, processor=processor, num_beams=1, max_retries=0, max_new_tokens=6,
                           progress=False)
        s2 = caption_folder(meta, model=model, processor=processor, num_beams=1, max_retries=0,
                            max_new_tokens=6, output="jsonl", progress=False)
    assert _names(p for p, _ in s.captioned) == set(todo)
    skip = {n for n, e in expected.items() if e == "skip"}
    assert skip <= _names(p for p, _ in s.failed)
    assert all("\n" not in why for _, why in s.failed)
    # only the new sidecars appeared; every other file in the dataset is byte-for-byte the same
    after = snapshot(ds)
    assert set(after) - set(before_ds) == {n.rsplit(".", 1)[0] + ".txt" for n in todo}
    assert all(after[k] == v for k, v in before_ds.items())
    assert all(PASSWD_MARK not in v.decode("utf-8", "replace") for v in after.values())
    # the metadata dataset: one row appended, every hostile line kept byte for byte
    assert [p.name for p, _ in s2.captioned] == ["uncaptioned.png"]
    lines = (meta / "metadata.jsonl").read_bytes().splitlines(keepends=True)
    assert b"".join(lines[:-1]) == before_meta and b"uncaptioned.png" in lines[-1]
    # nothing outside the two dataset folders changed; /etc/passwd was never opened
    now = snapshot(root, exclude=ds)
    changed = {k for k in set(before) | set(now) if before.get(k) != now.get(k)}
    assert changed == {"meta/metadata.jsonl"}
    assert "/etc/passwd" not in opened
    assert not outside(opened, [ds, meta, zoo_dir], root)
