"""The shipped default digits world (issue 18): it is the world the current code would build, it installs
verified, a damaged or hostile archive is refused, and a small rebuild reproduces its recorded layout."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

from harness.errors import HarnessError
from harness.world import digits as D
from harness.world import shipped


def _shipped_meta() -> dict:
    src = shipped.archive_path(0, D.WorldConfig().key())
    assert src.is_file(), (f"no shipped world for the default config (key {D.WorldConfig().key()}): the world's "
                           "config or version changed; rebuild it and run `python -m harness.world.pack_world`")
    with tarfile.open(src, "r:xz") as tar:
        return json.load(tar.extractfile(shipped.META))


def test_the_default_world_ships_for_the_current_config():
    meta = _shipped_meta()
    assert meta["key"] == D.WorldConfig().key() and meta["version"] == D.WORLD_VERSION
    assert meta["config"] == json.loads(json.dumps(asdict(D.WorldConfig())))
    assert set(meta["parts"]) >= set(D.PARTS) and not any("failed" in p for p in meta["parts"].values())
    assert meta["shipped"]["files"] and meta["shipped"]["tensors"]


def _fake_world(root):
    (root / "sd").mkdir(parents=True)
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(root / "sd" / "model.safetensors"))
    for part in D.PARTS[1:]:
        (root / part).mkdir()
        (root / part / "config.json").write_text(json.dumps({"part": part}))
    meta = {"kind": "digits", "version": 1, "key": "abc", "config": {"seed": 7},
            "parts": {p: {} for p in D.PARTS}}
    (root / "world.json").write_text(json.dumps(meta))
    return root


def test_pack_then_install_verifies_every_file(tmp_path):
    out = shipped.pack(_fake_world(tmp_path / "w"), tmp_path / "assets")
    assert out.name == "digits-7-abc.tar.xz"
    shipped.ASSETS, old = tmp_path / "assets", shipped.ASSETS
    try:
        assert shipped.install(7, "abc", tmp_path / "cache" / "w")
        assert not shipped.install(7, "abc", tmp_path / "cache" / "w"), "an existing folder is never replaced"
        assert not shipped.install(7, "other", tmp_path / "cache" / "x"), "no archive for that key"
    finally:
        shipped.ASSETS = old
    meta = json.loads((tmp_path / "cache" / "w" / "world.json").read_text())
    assert meta["shipped"]["tensors"] == {"sd/model.safetensors": {"w": [2, 3]}}
    assert (tmp_path / "cache" / "w" / "clip" / "config.json").is_file()


def _retar(src, dst, edit):
    with tarfile.open(src, "r:xz") as tin, tarfile.open(dst, "w:xz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None
            m, data = edit(m, data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
        extra = edit(None, None)
        if extra:
            tout.addfile(*extra)


@pytest.mark.parametrize("attack", ["tampered", "symlink"])
def test_a_damaged_or_hostile_archive_is_refused_and_leaves_nothing(tmp_path, attack):
    good = shipped.pack(_fake_world(tmp_path / "w"), tmp_path / "good")
    bad = tmp_path / "assets" / good.name
    bad.parent.mkdir()

    def edit(m, data):
        if m is None:
            if attack != "symlink":
                return None
            link = tarfile.TarInfo("clip/escape")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            return (link,)
        if attack == "tampered" and m.name == "clip/config.json":
            data = b'{"part": "evil"}'
            m.size = len(data)
        return m, data

    _retar(good, bad, edit)
    shipped.ASSETS, old = tmp_path / "assets", shipped.ASSETS
    try:
        with pytest.raises((HarnessError, tarfile.TarError), match="damaged|escape|link|outside"):
            shipped.install(7, "abc", tmp_path / "cache" / "w")
    finally:
        shipped.ASSETS = old
    assert not (tmp_path / "cache" / "w").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [], "no temp folder left behind"


@pytest.mark.slow
def test_a_small_rebuild_reproduces_the_shipped_layout(tmp_path):
    """Every tensor the shipped world holds, a rebuild by today's code holds with the same shape (training
    lengths change values, never names or shapes): the archive is this code's world, not an older one."""
    meta = _shipped_meta()
    world = D.build_world(tmp_path / "w", D.WorldConfig().scaled(0.01), parts=("sd", "clip", "yolo"))
    rebuilt = shipped.tensor_shapes(world)
    recorded = {f: t for f, t in meta["shipped"]["tensors"].items() if f.split("/")[0] in ("sd", "clip", "yolo")}
    assert rebuilt == recorded


def test_rebuild_refuses_a_folder_that_holds_a_world(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "world.json").write_text("{}")
    with pytest.raises(HarnessError, match=r"already there; --rebuild builds into an absent or empty folder"):
        D.digits_world(D.WorldConfig().scaled(0.01), tmp_path / "w", rebuild=True)
