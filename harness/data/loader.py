"""The training loader: dataset items -> normalised tensors, with the preprocessing in one visible place.

Per item: read the bytes once, decode upright RGB (:func:`open_rgb`), resize so the image covers the
target size (no squashing), crop to the target (centre, or random jitter), optionally flip, scale
to [-1, 1]. ``key`` hashes the image bytes together with every parameter that changed the pixels,
so it can key a latent cache. Randomness (crop, flip, tag shuffle, caption dropout) is drawn from
(seed, epoch, index), so a resumed run sees the same samples.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.data.buckets import make_buckets, nearest_bucket
from harness.data.folder import DatasetIndex
from harness.data.images import DEFAULT_MAX_PIXELS, image_size, open_rgb
from harness.errors import HarnessError

RESIZE_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "nearest": Image.Resampling.NEAREST,
}
# Bump when the preprocessing below changes, so cached latents keyed on the old one are not reused.
PREPROCESS_VERSION = 1


def get_resize_filter(name: str) -> Image.Resampling:
    try:
        return RESIZE_FILTERS[name]
    except KeyError:
        raise HarnessError(f"resize_filter: unknown {name!r}; known: {', '.join(RESIZE_FILTERS)}") from None


def as_size(resolution) -> tuple[int, int]:
    """``512`` -> (512, 512); ``(w, h)`` stays (width, height)."""
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        size = (resolution, resolution)
    elif isinstance(resolution, Sequence) and len(resolution) == 2:
        size = (int(resolution[0]), int(resolution[1]))
    else:
        raise HarnessError(f"resolution: expected an int or (width, height), got {resolution!r}")
    if min(size) < 8:
        raise HarnessError(f"resolution: expected at least 8 pixels a side, got {size}")
    return size


def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The smallest resize of ``size`` (aspect kept) that covers ``target``."""
    w, h = size
    tw, th = target
    scale = max(tw / w, th / h)
    return max(tw, round(w * scale)), max(th, round(h * scale))


def crop_offset(resized: tuple[int, int], target: tuple[int, int], rng: random.Random | None) -> tuple[int, int]:
    """(left, top) of the crop: centred, or uniform over all valid offsets when ``rng`` is given."""
    dx, dy = resized[0] - target[0], resized[1] - target[1]
    if rng is None:
        return dx // 2, dy // 2
    return rng.randint(0, dx), rng.randint(0, dy)


def process_caption(caption: str | None, *, shuffle_tags_after: int | None = None, caption_dropout: float = 0.0,
                    rng: random.Random | None = None) -> str:
    """Shuffle comma-separated tags after the first ``shuffle_tags_after``; drop the caption entirely
    with probability ``caption_dropout`` (the empty prompt trains the unconditional branch for CFG)."""
    rng = rng or random.Random(0)
    text = caption or ""
    if shuffle_tags_after is not None and "," in text:
        tags = [t.strip() for t in text.split(",") if t.strip()]
        head, tail = tags[:shuffle_tags_after], tags[shuffle_tags_after:]
        rng.shuffle(tail)
        text = ", ".join(head + tail)
    if caption_dropout > 0 and rng.random() < caption_dropout:
        return ""
    return text


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB -> float [3, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """A :class:`DatasetIndex` as a torch Dataset. ``resolution`` is an int (square) or (width, height);
    ``buckets`` (True for :func:`make_buckets(resolution)`, or a list of (width, height)) gives each item
    the bucket nearest its aspect ratio instead; ``target_sizes`` feeds :class:`BucketBatchSampler`."""

    def __init__(self, index: DatasetIndex, *, resolution=512, resize_filter: str = "bicubic",
                 random_crop: bool = False, flip_p: float = 0.0, shuffle_tags_after: int | None = None,
                 caption_dropout: float = 0.0, seed: int = 0, buckets=None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        for name, p in (("flip_p", flip_p), ("caption_dropout", caption_dropout)):
            if not 0.0 <= p <= 1.0:
                raise HarnessError(f"{name}: expected a probability in [0, 1], got {p!r}")
        if shuffle_tags_after is not None and shuffle_tags_after < 0:
            raise HarnessError(f"shuffle_tags_after: expected >= 0 or None, got {shuffle_tags_after!r}")
        self.index, self.items = index, list(index.items)
        self.resolution = as_size(resolution)
        self.filter_name, self._filter = resize_filter, get_resize_filter(resize_filter)
        self.random_crop, self.flip_p = random_crop, flip_p
        self.shuffle_tags_after, self.caption_dropout = shuffle_tags_after, caption_dropout
        self.seed, self.epoch, self.max_pixels = seed, 0, max_pixels
        if buckets is True:
            buckets = make_buckets(self.resolution[0])
        self.buckets = [tuple(b) for b in buckets] if buckets else None
        self.target_sizes = [self._target(item) for item in self.items]

    def _target(self, item) -> tuple[int, int]:
        if not self.buckets:
            return self.resolution
        size = item.size or image_size(item.path, max_pixels=self.max_pixels)
        return nearest_bucket(size, self.buckets)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        try:
            data = Path(item.path).read_bytes()
        except OSError as e:
            raise HarnessError(f"{item.path}: cannot read ({e.strerror or e})") from e
        img = open_rgb(item.path, max_pixels=self.max_pixels, data=data)
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        target = self.target_sizes[i]
        resized = cover_size(img.size, target)
        left, top = crop_offset(resized, target, rng if self.random_crop else None)
        flipped = self.flip_p > 0 and rng.random() < self.flip_p
        out = img.resize(resized, self._filter).crop((left, top, left + target[0], top + target[1]))
        if flipped:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image_sha = hashlib.sha256(data).hexdigest()
        params = {"v": PREPROCESS_VERSION, "image": image_sha, "resized": resized, "crop": [left, top],
                  "target": target, "filter": self.filter_name, "flip": flipped}
        scale = img.size[0] / resized[0]
        box = [round(left * scale), round(top * scale), round((left + target[0]) * scale),
               round((top + target[1]) * scale)]
        caption = process_caption(item.caption, shuffle_tags_after=self.shuffle_tags_after,
                                  caption_dropout=self.caption_dropout, rng=rng)
        return {
            "pixel_values": to_tensor(out),
            "caption": caption,
            "key": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest(),
            "image_sha256": image_sha,
            "path": str(item.path),
            "index": i,
            "original_size": torch.tensor([img.size[1], img.size[0]]),
            "crop_top_left": torch.tensor([top, left]),
            "target_size": torch.tensor([target[1], target[0]]),
            "crop": torch.tensor(box),
            "flipped": flipped,
        }
