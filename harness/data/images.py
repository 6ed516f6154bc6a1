"""Opening images safely: one place that turns any file a user or scraper produced into an RGB image.

Every reader in the harness (loader, captioner, stats, metrics) goes through :func:`open_rgb`, so the
rules live here once: refuse decompression bombs before decoding, honour EXIF orientation, take the
first frame of animations, and map every PIL mode (RGBA, P, L, CMYK, 16-bit, float) to 8-bit RGB.
Failures become a one-line :class:`HarnessError` naming the path and the reason.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from harness.errors import HarnessError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# 64 MP: a 8000x8000 photo passes; a 65535x65535 PNG header (4.3 GP, ~13 GB decoded) does not.
DEFAULT_MAX_PIXELS = 64_000_000
# Beyond this a "photo" is a strip: resizing it to cover a 512 px square would allocate gigapixels.
MAX_ASPECT = 40.0
# Background for transparent pixels: white matches how most viewers (and scrapers' thumbnails) show them.
ALPHA_BACKGROUND = (255, 255, 255)
# EXIF orientations 5-8 swap width and height.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}

_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError,
                Image.DecompressionBombError, MemoryError, TypeError, IndexError, KeyError, ImportError)


def _pil_open(source) -> Image.Image:
    """PIL's own ``Image.open``. Importing ultralytics replaces it with a wrapper that, on any file PIL
    cannot identify, tries to pip-install pi-heif (and raises ModuleNotFoundError offline); a
    scraped folder full of junk must not trigger installs, so unwrap it when present."""
    opener = Image.open
    original = getattr(sys.modules.get(getattr(opener, "__module__", "") or ""), "_image_open", None)
    return (original if callable(original) else opener)(source)


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _reason(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image PIL can identify"
    if isinstance(e, (EOFError, SyntaxError)) or "truncated" in str(e).lower():
        return f"truncated or corrupt image ({e})" if str(e) else "truncated or corrupt image"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"cannot decode image ({text[:160]})"


def _open_checked(source, path: Path, max_pixels: int) -> Image.Image:
    """``Image.open`` (header only) plus the pixel-limit check, with errors made one line."""
    if isinstance(source, Path):
        try:
            if source.stat().st_size == 0:
                raise HarnessError(f"{path}: empty file (0 bytes)")
        except OSError as e:
            raise HarnessError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        with warnings.catch_warnings():
            # We apply our own limit below; PIL's warning would just be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = _pil_open(source)
    except Image.DecompressionBombError as e:
        # PIL stops at twice its own limit before we see the size; say it in the same words as ours.
        found = re.search(r"\((\d+) pixels\)", str(e))
        claimed = f"{int(found.group(1)):,} pixels" if found else "the image"
        raise HarnessError(f"{path}: refused: {claimed} is above the limit of {max_pixels:,} (max_pixels) and "
                           "PIL's decompression-bomb guard") from e
    except _READ_ERRORS as e:
        raise HarnessError(f"{path}: {_reason(e)}") from e
    w, h = im.size
    if w <= 0 or h <= 0:
        raise HarnessError(f"{path}: image has an empty size {w}x{h}")
    if max(w / h, h / w) > MAX_ASPECT:
        raise HarnessError(f"{path}: refused: absurd dimensions {w}x{h} (aspect ratio above {MAX_ASPECT:g}:1)")
    if w * h > max_pixels:
        raise HarnessError(f"{path}: refused: {w}x{h} = {w * h:,} pixels is above the limit of "
                           f"{max_pixels:,} (max_pixels; raise it if this image is genuine)")
    decoded = w * h * bytes_per_pixel(im.mode)
    if decoded > 3 * max_pixels:  # the budget of an 8-bit RGB image at the pixel limit
        raise HarnessError(f"{path}: refused: {w}x{h} in mode {im.mode} decodes to {decoded / 2**20:,.0f} MiB, above "
                           f"the limit of {3 * max_pixels / 2**20:,.0f} MiB (3 bytes x max_pixels; raise max_pixels "
                           "if this image is genuine)")
    return im


# Bytes a decoded pixel takes in memory, by PIL mode (16/32-bit and float images are the costly ones).
_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
          "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}


def bytes_per_pixel(mode: str) -> int:
    if mode.startswith("I;16"):
        return 2
    return _BYTES.get(mode, 4)


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # malformed EXIF blocks are common in scraped files; treat as upright
        return 1


def image_size(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as displayed (after EXIF rotation), reading only the header."""
    path = Path(path)
    im = _open_checked(path, path, max_pixels)
    with im:
        w, h = im.size
        return (h, w) if _orientation(im) in _TRANSPOSED_ORIENTATIONS else (w, h)


def verify_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Decode the whole file (cheaply: JPEGs at 1/8 scale) to catch truncation; return the displayed size."""
    path = Path(path)
    im = _open_checked(path, path, max_pixels)
    with im:
        w, h = im.size
        if im.format == "JPEG":
            # DCT scaling still reads every byte of the stream, so truncation is still caught.
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        try:
            im.load()
        except _READ_ERRORS as e:
            raise HarnessError(f"{path}: {_reason(e)}") from e
        return (h, w) if _orientation(im) in _TRANSPOSED_ORIENTATIONS else (w, h)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _wide_to_rgb(im)
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _wide_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit integer and float images: scale to 8 bits instead of PIL's clipping (which turns
    a 16-bit photo almost white)."""
    arr = np.asarray(im).astype(np.float32)  # float32: a 64 MP float TIFF costs 256 MiB here, not 512
    if im.mode == "F":
        peak = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
    elif im.mode.startswith("I;16"):
        peak = 65535.0
    else:  # "I": 16-bit PNGs decode to this; an 8-bit range image stays as is
        peak = 65535.0 if arr.size and arr.max() > 255 else 255.0
    arr = np.nan_to_num(arr, nan=0.0)
    out = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L").convert("RGB")


def open_rgb(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None) -> Image.Image:
    """Decode ``path`` (or its already-read ``data``) to an upright 8-bit RGB image.

    Refuses images above ``max_pixels`` before decoding; uses the first frame of animated files.
    Raises :class:`HarnessError` naming the path and the reason for anything unreadable.
    """
    path = Path(path)
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise HarnessError(f"{path}: cannot read ({e.strerror or e})") from e
    if not data:
        raise HarnessError(f"{path}: empty file (0 bytes)")
    im = _open_checked(io.BytesIO(data), path, max_pixels)
    try:
        with im:
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            try:
                upright = ImageOps.exif_transpose(im)
            except Exception as e:  # broken EXIF: keep the stored orientation rather than drop the image
                log.debug("%s: ignoring unreadable EXIF orientation (%s)", path, e)
                upright = im.copy()
            upright = upright if upright is not im else im.copy()
            return _to_rgb(upright)
    except HarnessError:
        raise
    except _READ_ERRORS as e:
        raise HarnessError(f"{path}: {_reason(e)}") from e
