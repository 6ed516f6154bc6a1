"""Reading user images and masks for image-to-image work (refinement, inpainting)."""

from __future__ import annotations

from pathlib import Path

import torch

from harness.errors import ConfigError, HarnessError


def open_image(src):
    """A PIL image from a path or PIL image (loaded fully, so the file is closed)."""
    from PIL import Image, UnidentifiedImageError

    if hasattr(src, "mode") and hasattr(src, "size"):
        return src
    try:
        with Image.open(Path(src)) as im:
            im.load()
            return im.copy()
    # ImportError: a third-party opener registered with PIL (ultralytics' HEIF hook) may raise it for junk
    except (OSError, ValueError, ImportError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise HarnessError(f"{src}: cannot read the image ({type(e).__name__}: {e})") from e


def rgb_tensor(src, name: str = "image", multiple: int = 8) -> torch.Tensor:
    """(1, 3, H, W) floats in [0, 1] from an RGB image whose sides are multiples of ``multiple``."""
    import numpy as np

    im = open_image(src)
    where = src if isinstance(src, (str, Path)) else name
    if im.mode != "RGB":
        raise ConfigError(f"{where}: image mode is {im.mode}; expected RGB (convert it, e.g. "
                          f"Image.open(p).convert('RGB'))")
    w, h = im.size
    if w % multiple or h % multiple:
        raise ConfigError(f"{where}: size {w}x{h}; width and height must be multiples of {multiple}")
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def mask_tensor(src, size: tuple[int, int], name: str = "mask") -> torch.Tensor:
    """(1, 1, H, W) in {0, 1} (1 = regenerate) from a mask image the same size as the image.

    Any mode is accepted (L, 1, RGB, RGBA: the alpha-free luminance is used); values > 0.5 count as masked."""
    import numpy as np

    im = open_image(src)
    where = src if isinstance(src, (str, Path)) else name
    if im.size != tuple(size):
        raise ConfigError(f"{where}: mask is {im.size[0]}x{im.size[1]} but the image is {size[0]}x{size[1]}; "
                          "they must be the same size")
    arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((arr > 0.5).astype(np.float32))[None, None]
