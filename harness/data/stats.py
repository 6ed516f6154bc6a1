"""``harness data stats``: what is in a dataset folder before a GPU-hour is spent on it."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from harness.data.folder import scan_dataset
from harness.data.images import DEFAULT_MAX_PIXELS

MEGAPIXEL_BINS = [(0.0, 0.25), (0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, 8.0), (8.0, float("inf"))]
# width / height
ASPECT_BINS = [("< 1:2", 0.0, 0.5), ("1:2 - 3:4", 0.5, 0.75), ("3:4 - 1:1", 0.75, 0.97), ("~1:1", 0.97, 1.03),
               ("1:1 - 4:3", 1.03, 1.34), ("4:3 - 2:1", 1.34, 2.0), ("> 2:1", 2.0, float("inf"))]


def _describe(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "min": min(values), "mean": round(statistics.fmean(values), 2),
            "median": statistics.median(values), "max": max(values)}


def megapixel_histogram(sizes: list[tuple[int, int]]) -> dict[str, int]:
    out = {}
    for lo, hi in MEGAPIXEL_BINS:
        label = f"{lo:g}-{hi:g} MP" if hi != float("inf") else f">= {lo:g} MP"
        out[label] = sum(1 for w, h in sizes if lo <= w * h / 1e6 < hi)
    return out


def aspect_histogram(sizes: list[tuple[int, int]]) -> dict[str, int]:
    return {label: sum(1 for w, h in sizes if lo <= w / h < hi) for label, lo, hi in ASPECT_BINS}


def dataset_stats(root, *, max_pixels: int = DEFAULT_MAX_PIXELS, verify: bool = True) -> dict:
    """Counts, resolution and aspect histograms, caption length statistics and the unreadable files."""
    index = scan_dataset(root, max_pixels=max_pixels, verify=verify)
    sizes = [it.size for it in index.items if it.size]
    captions = [it.caption for it in index.items if it.caption]
    return {
        "root": str(index.root),
        "images": len(index.items),
        "splits": dict(Counter(it.split or "(none)" for it in index.items)),
        "captioned": len(captions),
        "uncaptioned": len(index.items) - len(captions),
        "caption_sources": dict(Counter(it.caption_source for it in index.items if it.caption_source)),
        "formats": dict(Counter(it.path.suffix.lower() for it in index.items)),
        "width": _describe([w for w, _ in sizes]),
        "height": _describe([h for _, h in sizes]),
        "megapixels": megapixel_histogram(sizes),
        "aspect": aspect_histogram(sizes),
        "caption_words": _describe([len(c.split()) for c in captions]),
        "caption_chars": _describe([len(c) for c in captions]),
        "skipped": [(str(p), why) for p, why in index.skipped],
    }


def _bars(hist: dict[str, int], width: int = 30) -> list[str]:
    peak = max(hist.values(), default=0) or 1
    return [f"    {label:>12} {n:6d} {'#' * round(width * n / peak)}" for label, n in hist.items()]


def format_stats(stats: dict) -> str:
    def line(name: str, d: dict) -> str:
        if not d.get("n"):
            return f"  {name}: -"
        return f"  {name}: min {d['min']}  median {d['median']}  mean {d['mean']}  max {d['max']}"

    out = [f"{stats['root']}",
           f"  images: {stats['images']}   captioned: {stats['captioned']}   uncaptioned: {stats['uncaptioned']}"
           f"   unreadable/skipped: {len(stats['skipped'])}",
           "  splits: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["splits"].items())),
           "  formats: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["formats"].items())),
           line("width px", stats["width"]), line("height px", stats["height"]),
           "  resolution (megapixels):", *_bars(stats["megapixels"]),
           "  aspect (width:height):", *_bars(stats["aspect"]),
           line("caption words", stats["caption_words"]), line("caption chars", stats["caption_chars"])]
    if stats["skipped"]:
        out.append("  cannot use:")
        out += [f"    {Path(p)}: {why}" for p, why in stats["skipped"]]
    return "\n".join(out)
