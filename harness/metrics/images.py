"""Image input handling for every metric, in ONE visible place.

All metrics see images the same way, whatever the caller hands over:

* uint8 stays uint8; float images in [0, 1] become uint8 by ROUNDING (``round(255 * x)``), which is
  what saving a PNG does (diffusers' ``numpy_to_pil``), so in-memory and saved-image scores agree
  (torchmetrics truncates instead);
* grayscale (1 channel / PIL ``L``) is repeated to RGB, alpha is dropped;
* resizing is PIL bicubic on the uint8 RGB image, per image (clean-fid's argument: PIL's
  antialiased bicubic, not a framework's ``interpolate``), so mixed sizes in one set are fine. A
  non-square image reaches the extractor's square input one of three ways (``CROPS``), each named for
  the reference that does it:

  - ``none``: stretched to the square (clean-fid's Inception modes, dgm-eval's DINOv2);
  - ``resize-crop``: shorter side resized to the input size, then the centre cropped (torchvision's
    ``Resize(S)`` + ``CenterCrop(S)``, which CLIP's own processors and clean-fid's CLIP features use);
  - ``crop-resize``: the centred square cropped first, then resized (the CMMD reference's
    ``io_util._center_crop_and_resize``).

  Square images give the same pixels all three ways.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.data.images import IMAGE_EXTENSIONS, is_image_path, open_rgb
from harness.errors import HarnessError

log = logging.getLogger(__name__)

RESIZE_MODE = "pil_bicubic_uint8"
CROPS = ("none", "resize-crop", "crop-resize")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in or under ``folder``, sorted by relative path (the set's order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HarnessError(f"{folder}: not a folder of images")
    # Hidden entries (".tmp-*" folders of an unfinished atomic write) are not part of the set.
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise HarnessError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def load_image(path: str | Path) -> Image.Image:
    """Upright 8-bit RGB (the data stage's reader: EXIF orientation, alpha on white, 16-bit scaled)."""
    return open_rgb(path)


def float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8, rounding like the PNG path (not truncating)."""
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise HarnessError(
            f"images: float images must be in [0, 1], got values in [{lo:.3f}, {hi:.3f}]"
            " (diffusion outputs in [-1, 1] need (x + 1) / 2 first)"
        )
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8)


def _to_rgb_array(img) -> np.ndarray:
    """One image (PIL, HWC/CHW array or tensor) -> uint8 HxWx3."""
    if isinstance(img, Image.Image):
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    t = torch.as_tensor(np.asarray(img)) if not isinstance(img, torch.Tensor) else img
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise HarnessError(f"images: expected an image of shape [C, H, W] or [H, W], got {tuple(t.shape)}")
    if t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(2, 0, 1)  # HWC -> CHW
    if t.dtype != torch.uint8:
        t = float_to_uint8(t.float())
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t[:3].permute(1, 2, 0).cpu().numpy()


def clean_resize(arr: np.ndarray, size: int | None) -> np.ndarray:
    """THE resize: PIL bicubic on a uint8 RGB array to ``size`` x ``size`` (no-op when already there)."""
    if size is None or (arr.shape[0] == size and arr.shape[1] == size):
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), resample=Image.BICUBIC))


def fit_square(arr: np.ndarray, size: int | None, crop: str = "none") -> np.ndarray:
    """uint8 HxWx3 -> size x size by ``crop`` (see the module docstring); ``size`` None keeps it."""
    h, w = arr.shape[:2]
    if size is None or crop == "none" or h == w:
        return clean_resize(arr, size)
    if crop == "resize-crop":
        # torchvision's arithmetic, so the pixels are the references' own: the long side is truncated,
        # the crop offset rounded (Python's round, as torchvision's center_crop)
        short, long = min(h, w), max(h, w)
        nh, nw = (size, int(size * long / short)) if h < w else (int(size * long / short), size)
        r = np.asarray(Image.fromarray(arr).resize((nw, nh), resample=Image.BICUBIC))
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        return np.ascontiguousarray(r[top:top + size, left:left + size])
    if crop == "crop-resize":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2  # floor offsets, as the CMMD reference
        return clean_resize(np.ascontiguousarray(arr[top:top + side, left:left + side]), size)
    raise HarnessError(f"crop {crop!r}: unknown; known: {', '.join(CROPS)}")


def to_batch(images, size: int | None, crop: str = "none") -> torch.Tensor:
    """Any supported image input -> uint8 tensor [N, 3, size, size] (see the module docstring).

    ``images``: a uint8 or [0, 1] float tensor [N, C, H, W] / [N, H, W], or a sequence of PIL images,
    arrays or tensors (sizes may differ when ``size`` is given).
    """
    if isinstance(images, torch.Tensor) and images.ndim in (3, 4):
        t = images if images.ndim == 4 else images[:, None]
        if t.shape[1] not in (1, 3, 4):
            raise HarnessError(f"images: expected [N, C, H, W] with C in 1/3/4, got {tuple(images.shape)}")
        if t.dtype != torch.uint8:
            t = float_to_uint8(t.float())
        t = t[:, :3] if t.shape[1] != 1 else t.expand(-1, 3, -1, -1)
        if size is None or tuple(t.shape[-2:]) == (size, size):
            return t.contiguous()
        arrays = list(t.permute(0, 2, 3, 1).cpu().numpy())
    elif isinstance(images, (Sequence, np.ndarray)) and not isinstance(images, (str, bytes)):
        arrays = [_to_rgb_array(im) for im in images]
    else:
        raise HarnessError(f"images: expected a tensor or a list of images, got {type(images).__name__}")
    if not arrays:
        raise HarnessError("images: got an empty batch")
    arrays = [fit_square(a, size, crop) for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise HarnessError(
            f"images: mixed sizes {sorted(s[:2] for s in shapes)[:4]} and the extractor has no input size;"
            " give it one (input_size=...) so each image is resized to it"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
