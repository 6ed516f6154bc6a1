"""Test images for the data and caption stages: small real photos from scikit-image and generated
hostile files (nothing is downloaded)."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo(name: str, size: tuple[int, int] = (48, 32)) -> Image.Image:
    """A real photo from skimage.data, resized to (width, height)."""
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB").resize(size, Image.Resampling.BICUBIC)


def write_photos(folder: Path, names=PHOTOS, size=(48, 32), ext: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        path = folder / f"{name}{ext}"
        photo(name, size).save(path)
        out.append(path)
    return out


def png_bytes(width: int, height: int, *, mode_byte: int = 2, bit_depth: int = 8, idat: bytes = b"") -> bytes:
    """A PNG with a valid IHDR of any claimed size (so a header-only reader believes it) and the given IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, mode_byte, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat or zlib.compress(b"\0" * 16)) + \
        chunk(b"IEND", b"")


def exif_rotated_jpeg(path: Path, orientation: int = 6) -> Image.Image:
    """Save a landscape photo with an EXIF orientation tag; returns the stored (unrotated) image."""
    img = photo("rocket", (48, 24))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes(), quality=95)
    return img


def write_hostile(folder: Path, outside: Path) -> dict[str, str]:
    """Every kind of bad input the loader must skip; returns {name: expected reason fragment}.

    ``outside`` is a folder beside the dataset holding a file the dataset must never read."""
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(_png_of(photo("coffee")))
    good = io.BytesIO()
    photo("chelsea").save(good, format="JPEG")
    expected = {}
    (folder / "zero.png").write_bytes(b"")
    expected["zero.png"] = "empty file"
    (folder / "notimage.jpg").write_text("<html>this is not a jpeg</html>")
    expected["notimage.jpg"] = "not an image"
    (folder / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    expected["truncated.jpg"] = "truncated"
    (folder / "bomb.png").write_bytes(png_bytes(100_000, 100_000))
    expected["bomb.png"] = "above the limit"
    photo("astronaut").save(folder / "badcaption.png")
    (folder / "badcaption.txt").write_bytes(b"caf\xe9 \xff\xfe latin-1")
    expected["badcaption.png"] = "not UTF-8"
    photo("astronaut").save(folder / "hugecaption.png")
    (folder / "hugecaption.txt").write_bytes(b"word " * 20_000)
    expected["hugecaption.png"] = "larger than"
    os.symlink(outside / "secret.png", folder / "escape.png")
    expected["escape.png"] = "outside the dataset"
    os.symlink(folder / "loop_b.png", folder / "loop_a.png")
    os.symlink(folder / "loop_a.png", folder / "loop_b.png")
    expected["loop_a.png"] = "symlink loop"
    expected["loop_b.png"] = "symlink loop"
    os.symlink(folder, folder / "dirloop")
    expected["dirloop"] = "not followed"
    os.mkfifo(folder / "fifo.png")
    expected["fifo.png"] = "not a regular file"
    os.symlink("/nonexistent/nowhere.png", folder / "dangling.png")
    expected["dangling.png"] = "broken symlink"
    (folder / "strip.png").write_bytes(png_bytes(1, 1_000_000))
    expected["strip.png"] = "absurd dimensions"
    photo("astronaut").save(os.fsencode(folder) + b"/bad\xffname.png")
    expected["bad\ufffdname.png"] = "not valid UTF-8"
    lines = [
        json.dumps({"file_name": "../../etc/passwd", "text": "x"}),
        json.dumps({"file_name": "/etc/hostname", "text": "x"}),
        json.dumps({"file_name": "../outside/secret.png", "text": "x"}),
        "{this is not json",
        json.dumps(["a", "list"]),
        json.dumps({"file_name": "missing.png", "text": "gone"}),
        json.dumps({"file_name": "numbercaption.png", "text": 42}),
    ]
    photo("rocket").save(folder / "numbercaption.png")
    expected["numbercaption.png"] = "expected a string"
    (folder / "metadata.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe not utf8\n")
    for i, fragment in enumerate(["outside the dataset", "absolute", "outside the dataset", "not valid JSON",
                                  "not a JSON object", "no such file", None, "not UTF-8"], start=1):
        if fragment:
            expected[f"metadata.jsonl:{i}"] = fragment
    return expected


def _png_of(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pixel(img: Image.Image, xy) -> tuple:
    return tuple(int(v) for v in np.asarray(img)[xy[1], xy[0]])
