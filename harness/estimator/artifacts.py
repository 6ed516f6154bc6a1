"""Planting artifacts of graded severity into real photos: a labelled set whose truth is known.

No real ratings can be downloaded offline, so tests (and anyone checking the estimator end to end)
build images whose rating *is* the planted severity: 0 = untouched, 5 = ruined. Each kind mimics a
failure of diffusion samplers: burnt/oversaturated colour, blotchy noise patches, smears, JPEG
blocking and duplicated patch copies (the "extra limb" failure). Strength grows with severity.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from harness.errors import HarnessError

SCALE = (0, 5)


def _check(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise HarnessError(f"image: expected uint8 HxWx3, got {img.dtype} {img.shape}")
    return img


def _box(rng: np.random.Generator, h: int, w: int, frac: float) -> tuple[int, int, int, int]:
    bh, bw = max(2, int(h * frac)), max(2, int(w * frac))
    y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    return y, x, bh, bw


def burnt(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Oversaturated, over-contrasted colour pushed toward orange: the "burnt" CFG look."""
    a = severity / 5
    x = img.astype(np.float32) / 255
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * (1 + 1.5 * a)  # saturation
    x = 0.5 + (x - 0.5) * (1 + 0.6 * a)  # contrast
    x = x * (1 + a * np.array([0.2, 0.03, -0.2], np.float32))  # warm cast
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def noise_patches(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Blotchy low-frequency colour noise in ``severity`` patches."""
    h, w, _ = img.shape
    x = img.astype(np.float32)
    for _ in range(int(round(severity))):
        y0, x0, bh, bw = _box(rng, h, w, 0.3)
        blot = rng.normal(0, 1, (max(1, bh // 6), max(1, bw // 6), 3)).astype(np.float32)
        blot = np.asarray(Image.fromarray(((np.clip(blot, -2.5, 2.5) + 2.5) * 51).astype(np.uint8))
                          .resize((bw, bh), Image.BILINEAR), np.float32) - 127.5
        x[y0:y0 + bh, x0:x0 + bw] += 0.9 * blot
    return np.clip(x, 0, 255).astype(np.uint8)


def smear(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Motion-blur-like smears over ``severity`` regions."""
    h, w, _ = img.shape
    out = img.copy()
    for _ in range(int(round(severity))):
        y0, x0, bh, bw = _box(rng, h, w, 0.35)
        region = Image.fromarray(out[y0:y0 + bh, x0:x0 + bw])
        k = max(3, int(min(bh, bw) * 0.4)) | 1
        blurred = region.filter(ImageFilter.BoxBlur(k // 2)).filter(ImageFilter.GaussianBlur(k / 4))
        out[y0:y0 + bh, x0:x0 + bw] = np.asarray(blurred)
    return out


_JPEG_QUALITY = {1: 40, 2: 20, 3: 10, 4: 5, 5: 2}


def jpeg_blocking(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """JPEG compression at a quality that falls with severity (blocking and ringing)."""
    s = int(round(severity))
    if s <= 0:
        return img.copy()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=_JPEG_QUALITY[min(s, 5)])
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy()


def duplicate_patches(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Copies of image patches pasted elsewhere: the duplicated-limb failure."""
    h, w, _ = img.shape
    out = img.copy()
    for _ in range(int(round(severity))):
        y0, x0, bh, bw = _box(rng, h, w, 0.25)
        y1, x1 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        out[y1:y1 + bh, x1:x1 + bw] = img[y0:y0 + bh, x0:x0 + bw]
    return out


ARTIFACTS = {
    "burnt": burnt, "noise_patches": noise_patches, "smear": smear,
    "jpeg_blocking": jpeg_blocking, "duplicate_patches": duplicate_patches,
}


def plant(img: np.ndarray, severity: int, rng: np.random.Generator,
          kinds: Sequence[str] = tuple(ARTIFACTS)) -> np.ndarray:
    """Apply each artifact in ``kinds`` at ``severity`` (0..5); severity 0 returns a copy."""
    _check(img)
    if not SCALE[0] <= severity <= SCALE[1]:
        raise HarnessError(f"severity: expected {SCALE[0]}..{SCALE[1]}, got {severity}")
    unknown = [k for k in kinds if k not in ARTIFACTS]
    if unknown:
        raise HarnessError(f"artifact kinds: unknown {unknown}; known: {', '.join(ARTIFACTS)}")
    out = img.copy()
    if severity == 0:
        return out
    # Geometry first, then blocking, then colour, so each stays visible in the result.
    for name in ("duplicate_patches", "smear", "noise_patches", "jpeg_blocking", "burnt"):
        if name in kinds:
            out = ARTIFACTS[name](out, severity, rng)
    return out


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera", "moon", "coins", "grass", "gravel", "brick", "cell", "clock")


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as uint8 RGB."""
    import skimage.data

    a = getattr(skimage.data, name)()
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=2)
    return np.ascontiguousarray(a[..., :3]).astype(np.uint8)


def random_crop(img: np.ndarray, rng: np.random.Generator, long_side: int) -> np.ndarray:
    """A crop of random aspect (0.6..1.6) and scale, resized so its long side is ``long_side``."""
    h, w, _ = img.shape
    aspect = float(rng.uniform(0.6, 1.6))
    frac = float(rng.uniform(0.45, 0.95))
    ch = int(min(h, w / aspect) * frac)
    cw = int(ch * aspect)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(img[y:y + ch, x:x + cw])
    scale = long_side / max(ch, cw)
    return np.asarray(crop.resize((max(8, round(cw * scale)), max(8, round(ch * scale))), Image.LANCZOS))


def make_labelled_set(out_dir: str | Path, n: int, *, seed: int = 0, long_side: int = 128,
                      photos: Sequence[str] = PHOTOS, kinds: Sequence[str] = tuple(ARTIFACTS)) -> Path:
    """Write ``n`` PNG crops of ``photos`` with planted artifacts and ``ratings.csv``
    (columns: image, rating, group; group = source photo, so splits can hold whole photos out).

    Every rating is equally common (a shuffled 0..5 cycle); crops, severities and artifact placement
    are drawn from ``seed``."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = {name: photo(name) for name in photos}
    severities = np.resize(np.arange(SCALE[0], SCALE[1] + 1), n)
    rng.shuffle(severities)
    rows = []
    for i in range(n):
        name = photos[i % len(photos)]
        severity = int(severities[i])
        img = plant(random_crop(sources[name], rng, long_side), severity, rng, kinds)
        path = out / f"{i:05d}_{name}_s{severity}.png"
        Image.fromarray(img).save(path)
        rows.append({"image": path.name, "rating": severity, "group": name})
    table = out / "ratings.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table
