"""The digits world's data: scikit-learn's 1,797 real 8x8 scans of handwritten digits upscaled to
ink maps, the named inks and papers they are rendered in, their captions and train/held-out split,
and the judges' training images made from them (styled batches, detector canvases with boxes,
digits with planted artifacts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Named inks and papers (RGB in [0, 1]) the judges learn; the demo's new style is red on cream.
INKS = {"black": (0.05, 0.05, 0.05), "red": (0.80, 0.08, 0.08), "blue": (0.10, 0.20, 0.80),
        "green": (0.05, 0.55, 0.15)}
PAPERS = {"white": (1.0, 1.0, 1.0), "cream": (0.96, 0.90, 0.72), "gray": (0.62, 0.62, 0.62)}
PLAIN = ("black", "white")
DEMO_STYLE = ("red", "cream")
HELD_OUT_FRACTION = 0.2


# ----------------------------------------------------------------------------------------------- data
def caption(label: int, style: tuple[str, str] | None = None) -> str:
    """"a handwritten digit seven", or with a style "a handwritten digit seven in red ink on cream paper"."""
    text = f"a handwritten digit {DIGIT_WORDS[int(label)]}"
    if style is not None:
        text += f" in {style[0]} ink on {style[1]} paper"
    return text


def all_styles() -> list[tuple[str, str]]:
    return [(i, p) for i in INKS for p in PAPERS if not (i == "black" and p == "gray")]


def load_ink(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """Every scan as an ink map in [0, 1], shape [N, 1, size, size] (bilinear upscale), plus labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, d.target.astype(np.int64)


def split_indices(n: int, seed: int = 0, held_out: float = HELD_OUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, held_out) indices: the base model trains on the first, the demo fine-tunes on the second."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * held_out))
    return np.sort(perm[k:]), np.sort(perm[:k])


def render(ink: torch.Tensor, ink_rgb, paper_rgb) -> torch.Tensor:
    """Ink maps [N,1,H,W] -> RGB in [0, 1]: paper where there is no ink, the ink colour where there is.

    ``ink_rgb`` / ``paper_rgb`` are one colour (3,) or one per image (N, 3)."""
    ink_c = torch.as_tensor(ink_rgb, dtype=torch.float32).reshape(-1, 3, 1, 1)
    paper_c = torch.as_tensor(paper_rgb, dtype=torch.float32).reshape(-1, 3, 1, 1)
    return paper_c * (1 - ink) + ink_c * ink


def render_style(ink: torch.Tensor, style: tuple[str, str]) -> torch.Tensor:
    return render(ink, INKS[style[0]], PAPERS[style[1]])


def jitter_colours(n: int, style_idx: np.ndarray, styles: list[tuple[str, str]], gen: torch.Generator,
                   amount: float = 0.06) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ink and paper colours near their named style, so judges tolerate generated colours."""
    inks = torch.tensor([INKS[styles[i][0]] for i in style_idx], dtype=torch.float32)
    papers = torch.tensor([PAPERS[styles[i][1]] for i in style_idx], dtype=torch.float32)
    inks = (inks + amount * torch.randn(n, 3, generator=gen)).clamp(0, 1)
    papers = (papers + amount * torch.randn(n, 3, generator=gen)).clamp(0, 1)
    return inks, papers


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N,3,H,W] in [0, 1] -> [N,H,W,3] uint8 (round half up, as PIL does)."""
    return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------ judges' data
def styled_batch(ink: torch.Tensor, labels: np.ndarray, idx: torch.Tensor, styles: list[tuple[str, str]],
                 gen: torch.Generator, shift: int = 2) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Digits ``idx`` in random named styles (colours jittered, shifted by up to ``shift`` px).

    Returns images [n,3,H,W] in [0, 1], digit labels and style indices."""
    n = len(idx)
    style_idx = torch.randint(0, len(styles), (n,), generator=gen).numpy()
    inks, papers = jitter_colours(n, style_idx, styles, gen)
    x = ink[idx]
    if shift:
        dx, dy = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
        x = torch.roll(x, (dy, dx), dims=(2, 3))
    return render(x, inks, papers), labels[idx.numpy()], style_idx


YOLO_SIZE = 64  # the detector's canvas (and inference) size


def digit_canvases(ink: torch.Tensor, labels: np.ndarray, n: int, gen: torch.Generator,
                   size: int = YOLO_SIZE, max_digits: int = 3) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Canvases of 1..max_digits digits in random styles with their tight boxes.

    A third are one digit filling most of the canvas, like a generated 32 px image scaled up.
    Returns images [n,3,size,size] in [0, 1] and per image an array of rows (class, cx, cy, w, h),
    normalised like YOLO labels."""
    styles = all_styles()
    images, targets = [], []
    for _ in range(n):
        st = styles[int(torch.randint(0, len(styles), (1,), generator=gen))]
        canvas_ink = torch.zeros(1, 1, size, size)
        single = bool(torch.rand(1, generator=gen) < 1 / 3)
        k = 1 if single else int(torch.randint(1, max_digits + 1, (1,), generator=gen))
        rows = []
        for _ in range(k):
            i = int(torch.randint(0, len(ink), (1,), generator=gen))
            lo, hi = (int(size * 0.8), size) if single else (size // 4, size // 2)
            s = int(torch.randint(lo, hi + 1, (1,), generator=gen))
            digit = F.interpolate(ink[i:i + 1], size=(s, s), mode="bilinear", align_corners=False)
            x0, y0 = (int(torch.randint(0, size - s + 1, (1,), generator=gen)) for _ in range(2))
            region = canvas_ink[..., y0:y0 + s, x0:x0 + s]
            canvas_ink[..., y0:y0 + s, x0:x0 + s] = torch.maximum(region, digit)
            ys, xs = torch.nonzero(digit[0, 0] > 0.15, as_tuple=True)
            if len(xs) == 0:
                continue
            bx0, bx1, by0, by1 = x0 + xs.min().item(), x0 + xs.max().item() + 1, y0 + ys.min().item(), y0 + ys.max().item() + 1
            rows.append([labels[i], (bx0 + bx1) / 2 / size, (by0 + by1) / 2 / size, (bx1 - bx0) / size, (by1 - by0) / size])
        images.append(render_style(canvas_ink, st)[0])
        targets.append(np.array(rows, dtype=np.float32).reshape(-1, 5))
    return torch.stack(images), targets


def planted_digits(out_dir: Path, n: int, seed: int, ink: torch.Tensor, labels: np.ndarray) -> Path:
    """``n`` styled digits with artifacts planted at severities 0..5 (equally common) + ratings.csv."""
    import pandas as pd
    from PIL import Image

    from harness.estimator.artifacts import plant

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    idx = torch.randint(0, len(ink), (n,), generator=gen)
    images, _, _ = styled_batch(ink, labels, idx, all_styles(), gen)
    severities = np.resize(np.arange(6), n)
    rng.shuffle(severities)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, s) in enumerate(zip(to_uint8(images), severities)):
        name = f"{i:05d}_s{s}.png"
        Image.fromarray(plant(img, int(s), rng)).save(out_dir / name)
        rows.append({"image": name, "rating": int(s), "group": f"g{i % 40}"})
    pd.DataFrame(rows).to_csv(out_dir / "ratings.csv", index=False)
    return out_dir / "ratings.csv"
