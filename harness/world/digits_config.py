"""The digits world's configuration (:class:`WorldConfig`, whose key names the cached world) and the
small training-loop pieces every part's trainer shares: seeded index batches, a cosine LR schedule
and a progress bar."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

WORLD_VERSION = 3  # 2: text encoder run per distinct caption, fused AdamW, judges beside the UNet; 3: deterministic


@dataclass(frozen=True)
class WorldConfig:
    """Every knob that changes the built world (the cache key hashes all of it)."""

    seed: int = 0
    vae_steps: int = 150
    unet_steps: int = 1300
    clip_steps: int = 400
    blip_steps: int = 2000  # 500 steps learn the style words but not the digit (8% digit accuracy); 2000: 83%
    yolo_steps: int = 300
    estimator_steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3

    def scaled(self, scale: float) -> WorldConfig:
        """The same world with every training length multiplied by ``scale`` (fast tests use ~0.3)."""
        steps = {k: max(10, int(round(v * scale))) for k, v in asdict(self).items() if k.endswith("_steps")}
        return WorldConfig(**{**asdict(self), **steps})

    def key(self) -> str:
        blob = json.dumps({"version": WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _progress(total: int, desc: str):
    from harness.progress import Progress

    return Progress(total=total, desc=f"digits world: {desc}")


def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    """``steps`` index batches drawn epoch by epoch from a seeded permutation."""
    done, perm, pos = 0, torch.randperm(n, generator=gen), 0
    while done < steps:
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos:pos + batch]
        pos += batch
        done += 1


def _cosine(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup))) * 0.9 + 0.1
    return f
