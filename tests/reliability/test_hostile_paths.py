"""Nothing outside the dataset is read, written or followed by captioning (issue 21): symlinked, FIFO
and device journals, hard-linked captions. Every hostile file is made here; a sibling folder's
snapshot before and after shows nothing outside changed."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from _data_helpers import write_photos

from harness.caption.blip import JOURNAL_NAME, caption_folder, load_captioner, with_affixes
from harness.errors import HarnessError
from harness.io import append_jsonl, read_jsonl


@pytest.fixture(scope="module")
def blip(zoo_dir):
    return load_captioner(str(zoo_dir / "blip"))


def _snapshot(folder):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def outside(tmp_path):
    """A folder beside the dataset standing for the user's home: nothing in it may change."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export PATH=$PATH\n")
    (home / "secret.txt").write_text("my private key\n")
    return home


def test_symlinked_journal_is_refused_and_its_target_untouched(blip, tmp_path, outside):
    data = tmp_path / "data"
    write_photos(data, ["astronaut"])
    os.symlink(outside / ".bashrc", data / JOURNAL_NAME)
    (data / "$(touch PWNED).png").write_bytes((data / "astronaut.png").read_bytes())
    before = _snapshot(outside)
    model, proc = blip
    with pytest.raises(HarnessError, match=r"\.harness-captions\.jsonl: a symlink; the caption journal must be"):
        caption_folder(data, model=model, processor=proc, output="jsonl")
    assert _snapshot(outside) == before
    with pytest.raises(HarnessError, match="a symlink; refusing to write through it"):
        append_jsonl(data / JOURNAL_NAME, {"x": 1})
    assert _snapshot(outside) == before


def test_fifo_journal_never_hangs(blip, tmp_path):
    data = tmp_path / "data"
    write_photos(data, ["astronaut"])
    os.mkfifo(data / JOURNAL_NAME)
    model, proc = blip
    result = {}

    def run(output):
        try:
            result[output] = caption_folder(data, model=model, processor=proc, output=output, dry_run=False)
        except HarnessError as e:
            result[output] = e

    for output in ("txt", "jsonl"):  # a txt run never opens the journal; a jsonl run refuses it
        t = threading.Thread(target=run, args=(output,), daemon=True)
        t.start()
        t.join(120)
        assert not t.is_alive(), f"caption --output {output} hung on a FIFO journal"
    assert not isinstance(result["txt"], Exception) and (data / "astronaut.txt").is_file()
    assert isinstance(result["jsonl"], HarnessError) and "not a regular file" in str(result["jsonl"])


def test_read_jsonl_refuses_devices_and_huge_files(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.jsonl")
    with pytest.raises(HarnessError, match="zero.jsonl: not a regular file"):
        read_jsonl(tmp_path / "zero.jsonl")
    (tmp_path / "big.jsonl").write_text('{"a": 1}\n' * 100)
    with pytest.raises(HarnessError, match="big.jsonl: larger than 50 bytes"):
        read_jsonl(tmp_path / "big.jsonl", max_bytes=50)


def test_hard_linked_caption_is_skipped_not_read(blip, tmp_path, outside):
    from harness.data.folder import scan_dataset

    data = tmp_path / "data"
    write_photos(data, ["astronaut", "coffee"])
    os.link(outside / "secret.txt", data / "astronaut.txt")
    index = scan_dataset(data)
    assert "my private key" not in str([it.caption for it in index.items])
    assert any("hard-linked" in why for _, why in index.skipped)
    model, proc = blip
    s = caption_folder(data, model=model, processor=proc)
    assert all("my private key" not in text for _, text in s.captioned)
    assert (outside / "secret.txt").read_text() == "my private key\n"


def test_affixes_are_not_said_twice():
    assert with_affixes("a digit in red ink on cream paper", "", ", red ink") == "a digit in red ink on cream paper"
    assert with_affixes("a bird on a lake", "", ", unsplash photography") == "a bird on a lake, unsplash photography"
    assert with_affixes("photo of a cat", "photo of ", "") == "photo of a cat"


@pytest.mark.parametrize("where", ["", "/", "~", "DATA", "DATA/runs", "USERFILES"])
def test_output_dir_that_would_overwrite_user_files_is_refused(where, tmp_path, tiny_sd_dir, monkeypatch):
    from _train_helpers import make_dataset, quick_recipe

    from harness.train.loop import train

    data = make_dataset(tmp_path / "data")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "recipe.yaml").write_text("my own notes\n")
    monkeypatch.chdir(user)  # output_dir='' is the current folder: the user's files
    out = {"": "''", "~": str(Path.home()), "DATA": str(data), "DATA/runs": str(data / "runs"), "USERFILES": str(user)}.get(where, where)
    recipe = quick_recipe(tiny_sd_dir, data, tmp_path, output_dir=out)
    before = _snapshot(user), _snapshot(data)
    with pytest.raises(HarnessError, match="output_dir = .*(own new folder|overlaps the dataset|not a harness run)"):
        train(recipe)
    assert (_snapshot(user), _snapshot(data)) == before


LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['lol'] * 10)}]\n"
                 for i in range(9))


@pytest.mark.parametrize("kind", ["recipe", "suite"])
def test_yaml_alias_bomb_is_refused_at_once(kind, tmp_path):
    """A 1 KB file of nested aliases (10^9 values when expanded) is refused before it is built."""
    import time

    from harness.errors import ConfigError

    path = tmp_path / f"{kind}.yaml"
    path.write_text(LAUGHS)
    assert len(LAUGHS) < 1500
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"expands to [\d,]+ values through aliases") as e:
        if kind == "recipe":
            from harness.train.recipe import load_recipe

            load_recipe(path)
        else:
            from harness.eval.suite import load_suite

            load_suite(path)
    assert "\n" not in str(e.value) and time.perf_counter() - t0 < 10


@pytest.mark.parametrize("bad, match", [
    ("train.seed=-1", r"key 'train.seed' = -1: expected a value between 0 and 4294967295"),
    ("train.seed=123456789012345678901", r"key 'train.seed' = 123456789012345678901: expected a value between"),
    ("validation.seeds=[0, -3]", r"key 'validation.seeds' = -3: expected seeds between 0 and 4294967295"),
])
def test_out_of_range_seeds_are_one_line_errors(bad, match):
    from harness.errors import ConfigError
    from harness.train.recipe import load_recipe

    root = Path(__file__).resolve().parents[2]
    with pytest.raises(ConfigError, match=match) as e:
        load_recipe(root / "recipes" / "tiny-cpu.yaml", ["model.source=x", "data.root=y", bad])
    assert "\n" not in str(e.value)


def test_wide_images_are_limited_by_decoded_bytes_not_only_pixels(tmp_path):
    """A float or 16-bit image costs more memory per pixel than RGB: the limit is on decoded bytes."""
    import numpy as np
    from PIL import Image

    from harness.data.images import open_rgb

    Image.fromarray(np.zeros((90, 100), np.float32), mode="F").save(tmp_path / "float.tif")
    Image.fromarray(np.zeros((90, 100, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(HarnessError, match=r"float.tif: refused: 100x90 in mode F decodes to"):
        open_rgb(tmp_path / "float.tif", max_pixels=10_000)  # 36 KB decoded > 3 x 10,000
    assert open_rgb(tmp_path / "rgb.png", max_pixels=10_000).size == (100, 90)  # 27 KB: within


def test_suite_prompt_file_outside_its_folder_is_refused(tmp_path, outside):
    """Prompt lines are printed in the report: a suite must not read /etc/passwd or a private file."""
    from harness.errors import ConfigError
    from harness.eval.suite import load_suite

    suites = tmp_path / "suites"
    suites.mkdir()
    os.symlink(outside / "secret.txt", suites / "linked.txt")
    for ref, shown in (("/etc/passwd", "/etc/passwd"), ("../home/secret.txt", "secret.txt"),
                       ("linked.txt", "secret.txt")):
        (suites / "s.yaml").write_text(f"name: s\nprompts: {{x: {{file: {ref}}}}}\nmetrics: {{clip_score: {{}}}}\n")
        with pytest.raises(ConfigError, match=rf"prompts.x.file' = .*resolves to .*{shown}, outside the suite's folder"):
            load_suite(suites / "s.yaml")
    (suites / "ok.txt").write_text("a cat\n")
    (suites / "s.yaml").write_text("name: s\nprompts: {x: {file: ok.txt}}\nmetrics: {clip_score: {}}\n")
    assert load_suite(suites / "s.yaml").prompts["x"].file == "ok.txt"
