"""Offline fixtures for the metrics tests: tiny extractors, synthetic object canvases and a detector
that really finds the objects in them (so the cluster-KL machinery is tested on pixels, not on
hand-fed labels). Module-level so spawned worker processes can import them."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

BG = (128, 128, 128)
PALETTE = {0: [(220, 40, 40), (40, 200, 60)], 1: [(40, 60, 220), (230, 220, 40)]}  # square, disc
PLANTED = (200, 40, 220)  # the colour a "fine-tune" paints objects in


class PoolNet(torch.nn.Module):
    """A fixed random projection of 4x4-pooled pixels: uint8 [N,3,16,16] -> [N, 8]."""

    def __init__(self, dim: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(48, dim, generator=g) / 7, requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x.float() / 255, 4).flatten(1) @ self.proj


class ColorStats(torch.nn.Module):
    """Crop embedder: per-channel mean and std of the crop, uint8 [N,3,S,S] -> [N, 6]."""

    def forward(self, x):
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def canvases(n: int, seed: int, planted: float = 0.0, size: int = 64) -> list[Image.Image]:
    """Gray canvases with two objects each (square = class 0, disc = class 1) in separate quadrants;
    a fraction ``planted`` of objects is recoloured to PLANTED."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (size, size), BG)
        d = ImageDraw.Draw(im)
        for q in rng.choice(4, 2, replace=False):
            shape = int(rng.integers(0, 2))
            s = int(rng.integers(12, 20))
            x0 = (q % 2) * size // 2 + int(rng.integers(2, size // 2 - s - 1))
            y0 = (q // 2) * size // 2 + int(rng.integers(2, size // 2 - s - 1))
            base = PALETTE[shape][int(rng.integers(0, 2))]
            color = PLANTED if rng.random() < planted else base
            color = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in color)
            box = [x0, y0, x0 + s - 1, y0 + s - 1]
            (d.rectangle if shape == 0 else d.ellipse)(box, fill=color)
        out.append(im)
    return out


def shape_detector(images):
    """Connected non-background regions -> boxes; class by fill ratio (square ~1, disc ~0.79)."""
    from scipy import ndimage

    results = []
    for im in images:
        a = np.asarray(im.convert("RGB")).astype(int)
        mask = (np.abs(a - np.array(BG)).max(-1) > 20)
        labels, n = ndimage.label(mask)
        boxes, classes, scores = [], [], []
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            ys, xs = sl
            area = (ys.stop - ys.start) * (xs.stop - xs.start)
            fill = (labels[sl] == i).sum() / area
            boxes.append([xs.start, ys.start, xs.stop, ys.stop])
            classes.append(0 if fill > 0.9 else 1)
            scores.append(0.9)
        results.append((np.array(boxes, dtype=float).reshape(-1, 4), np.array(classes), np.array(scores)))
    return results


def empty_detector(images):
    return [(np.zeros((0, 4)), np.zeros(0), np.zeros(0)) for _ in images]
