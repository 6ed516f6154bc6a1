"""The default digits world, shipped with the package so a first ``harness demo`` need not rebuild it.

The world is deterministic and built by this project's own code (:mod:`.digits`), so the build a fresh
machine would spend ~15 minutes on is done once and shipped as ``assets/digits-SEED-KEY.tar.xz``. The
archive carries ``world.json`` with a ``shipped`` record: the config key, the world version, the commit
it was built at, each file's sha256, and each safetensors file's tensor names and shapes (what a rebuild
must reproduce). It is installed into the cache folder a build would have used, checked file by file,
only when the requested config's key is the shipped one: any change to the world's config or version
falls back to building (and ``tests/test_shipped_world.py`` fails until the archive is rebuilt with
``python -m harness.world.pack_world``). ``harness demo --rebuild`` always builds from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from harness.errors import HarnessError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
META = "world.json"


def archive_path(seed: int, key: str) -> Path:
    return ASSETS / f"digits-{seed}-{key}.tar.xz"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(world: Path) -> list[Path]:
    return sorted(p for p in world.rglob("*") if p.is_file() and p.name != META)


def tensor_shapes(world: Path) -> dict[str, dict[str, list[int]]]:
    """``{relative safetensors path: {tensor name: shape}}``: what a rebuild at any scale reproduces."""
    from safetensors import safe_open

    out = {}
    for p in _files(world):
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                out[str(p.relative_to(world))] = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    return out


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def pack(world: str | Path, out_dir: str | Path = ASSETS) -> Path:
    """Write ``out_dir/digits-SEED-KEY.tar.xz`` from a complete built world folder."""
    world = Path(world)
    meta = json.loads((world / META).read_text())
    missing = [p for p in ("sd", "clip", "blip", "yolo", "estimator") if p not in meta.get("parts", {})]
    if missing:
        raise HarnessError(f"{world}: not a complete digits world (parts missing: {missing}); build it first")
    meta["shipped"] = {"key": meta["key"], "version": meta["version"], "built_at_commit": _commit(),
                       "files": {str(p.relative_to(world)): _sha256(p) for p in _files(world)},
                       "tensors": tensor_shapes(world)}
    out = Path(out_dir) / f"digits-{meta['config']['seed']}-{meta['key']}.tar.xz"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        (Path(tmp) / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        part = Path(tmp) / out.name
        with tarfile.open(part, "w:xz", preset=9) as tar:
            tar.add(Path(tmp) / META, arcname=META)
            for p in _files(world):
                tar.add(p, arcname=str(p.relative_to(world)))
        os.replace(part, out)
    return out


def install(seed: int, key: str, dest: str | Path) -> bool:
    """Unpack the shipped world for (seed, key) into ``dest`` (absent), verified; False when none ships."""
    src, dest = archive_path(seed, key), Path(dest)
    if not src.is_file() or dest.exists():
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        with tarfile.open(src, "r:xz") as tar:
            tar.extractall(tmp, filter="data")  # no links out, no absolute paths, no devices
        meta = json.loads((tmp / META).read_text())
        record = meta.get("shipped", {})
        if record.get("key") != key:
            raise HarnessError(f"{src}: holds world {record.get('key')!r}, not {key!r}; rebuild the archive")
        bad = [f for f, digest in record["files"].items() if not (tmp / f).is_file() or _sha256(tmp / f) != digest]
        extra = sorted({str(p.relative_to(tmp)) for p in _files(tmp)} - set(record["files"]))
        if bad or extra:
            raise HarnessError(f"{src}: damaged ({len(bad)} file(s) differ from their recorded sha256, "
                               f"{len(extra)} unexpected); reinstall the package or pass --rebuild")
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("digits world: installed the shipped world %s -> %s", src.name, dest)
    return True
