"""Generate the hostile-input corpus (issue 10): broken, odd and malicious dataset files.

Run ``python tests/data/make_bad_corpus.py OUT_DIR`` to write it; the reliability tests call
:func:`make_corpus` into a temporary folder. Nothing is downloaded. ``EXPECTED`` says what the
harness must do with each file: ``ok`` (loads, converted to RGB) or ``skip`` (counted, with a reason).
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXPECTED: dict[str, str] = {}


def _photo(size=(48, 40)) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize(size, Image.BICUBIC)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width x height``, and a tiny IDAT: a decompression bomb
    in its cheapest form (the pixel count is what a careless loader allocates)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def make_corpus(out: str | os.PathLike) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    photo = _photo()

    def save(name, img, expect, caption="a photo", **kw):
        img.save(out / name, **kw)
        EXPECTED[name] = expect
        if caption is not None:
            (out / name).with_suffix(".txt").write_text(caption, encoding="utf-8")

    save("good.png", photo, "ok")
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    (out / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    EXPECTED["truncated.png"] = "skip"
    (out / "zero.png").write_bytes(b"")
    EXPECTED["zero.png"] = "skip"
    (out / "not_an_image.jpg").write_text("#!/bin/sh\necho this is a shell script\n")
    EXPECTED["not_an_image.jpg"] = "skip"
    (out / "bomb.png").write_bytes(_png_header_only(60000, 60000))  # 3.6 gigapixels claimed
    EXPECTED["bomb.png"] = "skip"
    (out / "absurd_wide.png").write_bytes(_png_header_only(2**31 - 1, 1))
    EXPECTED["absurd_wide.png"] = "skip"
    save("cmyk.jpg", photo.convert("CMYK"), "ok")
    arr16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    save("gray16.png", Image.fromarray(arr16), "ok")
    pal = photo.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    save("palette_transparent.png", pal, "ok", transparency=0)
    save("rgba.png", photo.convert("RGBA"), "ok")
    frames = [photo, photo.transpose(Image.FLIP_LEFT_RIGHT)]
    frames[0].save(out / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    EXPECTED["animated.gif"] = "ok"
    (out / "animated.txt").write_text("an animation", encoding="utf-8")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    photo.save(out / "exif_rotated.jpg", exif=exif.tobytes())
    EXPECTED["exif_rotated.jpg"] = "ok"
    (out / "exif_rotated.txt").write_text("rotated", encoding="utf-8")
    save("latin1_caption.png", photo, "skip", caption=None)
    (out / "latin1_caption.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    save("huge_caption.png", photo, "ok_or_skip", caption="word " * 400_000)  # ~2 MB caption
    try:
        os.symlink("loop_b", out / "loop_a.png")
        os.symlink("loop_a.png", out / "loop_b")
        EXPECTED["loop_a.png"] = "skip"
        os.symlink("/etc/passwd", out / "escape.png")
        EXPECTED["escape.png"] = "skip"
    except OSError:  # filesystems without symlinks
        pass
    return out


def make_metadata_corpus(out: str | os.PathLike) -> Path:
    """A metadata.jsonl dataset whose lines try to escape the folder or are broken."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _photo().save(out / "good.png")
    lines = [
        json.dumps({"file_name": "good.png", "text": "a good photo"}),
        json.dumps({"file_name": "../../etc/passwd", "text": "traversal"}),
        json.dumps({"file_name": "/etc/passwd", "text": "absolute"}),
        json.dumps({"file_name": "missing.png", "text": "missing file"}),
        "{this is not json",
        json.dumps({"text": "no file name"}),
        json.dumps(["a", "list"]),
    ]
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "bad")
    make_corpus(target)
    make_metadata_corpus(target / "metadata_ds")
    print(f"wrote {len(EXPECTED)} files to {target}")
