"""The hash rule behind the validation split: each image's side depends only on its own key and the seed.

Shuffle-then-cut splits reshuffle everything when one image is added; hashing the image's path keeps
every existing assignment when the folder grows (the new images fall on either side by the same rule).
The folder scanner applies it to images no metadata places; ``harness.data.split`` writes it down.
"""

from __future__ import annotations

import hashlib

from harness.errors import HarnessError


def split_fraction(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(key: str, val_fraction: float, seed: int = 0) -> str:
    """'val' for about ``val_fraction`` of keys, else 'train'; stable for a given key and seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise HarnessError(f"val_fraction: expected a number in [0, 1), got {val_fraction!r}")
    return "val" if split_fraction(key, seed) < val_fraction else "train"
