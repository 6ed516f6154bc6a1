"""Artifact maps: where in an image the estimator sees artifacts, for the report.

Two maps, both computed on the preview the estimator sees and mapped back onto the image's own
aspect (the letterbox padding is cut away before resizing):

* ``gradient`` - |d score / d preview| summed over colour channels, smoothed.
* ``occlusion`` - patch-level: the score drop when each patch of the preview is greyed out
  (positive = that patch raised the predicted rating).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.estimator.dataset import PAD_VALUE
from harness.estimator.score import ArtifactEstimator

METHODS = ("gradient", "occlusion")


def _content_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    return (size - nh) // 2, (size - nw) // 2, nh, nw


def _to_image(heat: torch.Tensor, h: int, w: int, size: int) -> np.ndarray:
    top, left, nh, nw = _content_box(h, w, size)
    crop = heat[top:top + nh, left:left + nw][None, None]
    out = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    out = out - out.min()
    return (out / out.max()).numpy() if out.max() > 0 else out.numpy()


def artifact_map(estimator: ArtifactEstimator, image: torch.Tensor, method: str = "gradient",
                 timestep: int = 0, patch: int = 4) -> np.ndarray:
    """HxW map in [0, 1] for one image (uint8 or float [3, H, W]); brighter = more artifact evidence."""
    if method not in METHODS:
        raise HarnessError(f"method: unknown {method!r}; known: {', '.join(METHODS)}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise HarnessError(f"image: expected [3, H, W], got shape {tuple(image.shape)}")
    h, w = image.shape[-2:]
    net, size = estimator.net, estimator.cfg.preview_size
    x = estimator.previews(estimator.encode_images(image[None])).detach()
    t = torch.tensor([timestep], device=x.device)
    if method == "gradient":
        x.requires_grad_(True)
        score = net.predict(net(x, t)).sum()
        (grad,) = torch.autograd.grad(score, x)
        heat = grad.abs().sum(dim=1, keepdim=True)
        heat = F.avg_pool2d(heat, 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    else:
        heat = _occlusion(net, x, t, patch)
    return _to_image(heat.detach().cpu().float(), h, w, size)


@torch.no_grad()
def _occlusion(net, x: torch.Tensor, t: torch.Tensor, patch: int) -> torch.Tensor:
    size = x.shape[-1]
    base = net.predict(net(x, t))
    heat = torch.zeros(size, size)
    variants, boxes = [], []
    for y0 in range(0, size, patch):
        for x0 in range(0, size, patch):
            v = x.clone()
            v[..., y0:y0 + patch, x0:x0 + patch] = PAD_VALUE
            variants.append(v)
            boxes.append((y0, x0))
    scores = torch.cat([net.predict(net(torch.cat(variants[i:i + 64]), t.expand(len(variants[i:i + 64]))))
                        for i in range(0, len(variants), 64)])
    for (y0, x0), s in zip(boxes, scores):
        heat[y0:y0 + patch, x0:x0 + patch] = (base - s).clamp(min=0).item()
    return heat


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 HxWx3 image with the heatmap blended in red (for the HTML report)."""
    if image.shape[:2] != heat.shape:
        raise HarnessError(f"overlay: image {image.shape[:2]} and heatmap {heat.shape} differ in size")
    red = np.zeros_like(image, dtype=np.float32)
    red[..., 0] = 255
    a = (alpha * heat)[..., None]
    return (image.astype(np.float32) * (1 - a) + red * a).clip(0, 255).astype(np.uint8)
