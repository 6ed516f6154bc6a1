"""Report plots: matplotlib (Agg) figures returned as PNG bytes, embedded in the HTML as data URIs.

Every function takes plain Python data and returns bytes, so plots are testable without a run.
User strings (metric labels, run names) only ever reach matplotlib as text, never as markup.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

plt.rcParams.update({"font.size": 8, "figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _clean(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def training_curves(records: Sequence[dict]) -> bytes | None:
    """Loss and validation loss, learning rate, and any in-training eval scores (``eval/...`` keys)
    against step, from a training run's metrics.jsonl."""
    keys = {r_key for r in records for r_key in r}
    panels = [("loss", [k for k in ("loss", "val_loss") if k in keys]), ("learning rate", ["lr"] if "lr" in keys else []),
              ("in-training eval", sorted(k for k in keys if k.startswith("eval/")))]
    panels = [(name, ks) for name, ks in panels if ks]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), squeeze=False)
    for ax, (name, ks) in zip(axes[0], panels):
        for k in ks:
            pts = [(r["step"], _clean(r[k])) for r in records if k in r and "step" in r]
            if pts:
                s, v = zip(*pts)
                ax.plot(s, v, marker="." if len(pts) < 50 else None, label=k)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        if name != "learning rate":
            ax.legend(fontsize=7)
    return _png(fig)


def surface_heatmaps(x_values: Sequence, y_values: Sequence, grids: dict[str, np.ndarray], *,
                     x_label: str, y_label: str, metric: str, higher_is_better: bool) -> bytes:
    """One heatmap per checkpoint of a per-cell metric over two axes (e.g. CFG x steps), on a shared
    colour scale, with the best cell of each outlined so a moved optimum is visible."""
    n = len(grids)
    fig, axes = plt.subplots(1, n, figsize=(1.2 + 0.55 * len(x_values) * n + 1.2 * n, 0.9 + 0.45 * len(y_values)),
                             squeeze=False)
    stacked = np.stack([np.asarray(g, dtype=float) for g in grids.values()])
    finite = stacked[np.isfinite(stacked)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    cmap = "viridis" if higher_is_better else "viridis_r"
    im = None
    for ax, (name, g) in zip(axes[0], grids.items()):
        g = np.asarray(g, dtype=float)
        im = ax.imshow(g, cmap=cmap, vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-9, aspect="auto")
        ax.set_xticks(range(len(x_values)), [str(v) for v in x_values])
        ax.set_yticks(range(len(y_values)), [str(v) for v in y_values])
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(name)
        ax.grid(False)
        for (yi, xi), v in np.ndenumerate(g):
            ax.text(xi, yi, "–" if not math.isfinite(v) else f"{v:.3g}", ha="center", va="center", fontsize=7,
                    color="white")
        if np.isfinite(g).any():
            flat = np.where(np.isfinite(g), g, -np.inf if higher_is_better else np.inf)
            best = np.unravel_index(np.argmax(flat) if higher_is_better else np.argmin(flat), g.shape)
            ax.add_patch(plt.Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, ec="red", lw=2))
    fig.colorbar(im, ax=list(axes[0]), label=metric, shrink=0.8)
    return _png(fig)


def metric_vs_step(series: dict[str, list[tuple[float, float, float, float]]], *, metric: str,
                   higher_is_better: bool | None, xlabel: str = "training step") -> bytes:
    """``series``: name -> [(step, value, ci_low, ci_high)], drawn as lines with CI bands."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for name, pts in series.items():
        pts = sorted(pts)
        if not pts:
            continue
        s, v, lo, hi = (np.array([_clean(p[i]) for p in pts]) for i in range(4))
        ax.plot(s, v, marker="o", label=name)
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.fill_between(s[ok], lo[ok], hi[ok], alpha=0.2)
    arrow = {True: " (higher is better)", False: " (lower is better)"}.get(higher_is_better, "")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric + arrow)
    if len(series) > 1:
        ax.legend()
    return _png(fig)


def grouped_bars(groups: Sequence[str], series: dict[str, Sequence[float]], *, ylabel: str,
                 errors: dict[str, Sequence[tuple[float, float]]] | None = None) -> bytes:
    """Bars per group (e.g. prompt set) for each series (e.g. checkpoint), with optional CI whiskers."""
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(groups) * max(1, len(series)) * 0.6, 3.0))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, vals) in enumerate(series.items()):
        vals = np.array([_clean(v) for v in vals])
        yerr = None
        if errors and name in errors:
            lo = np.array([_clean(e[0]) for e in errors[name]])
            hi = np.array([_clean(e[1]) for e in errors[name]])
            yerr = np.nan_to_num(np.stack([vals - lo, hi - vals]), nan=0.0).clip(min=0)
        ax.bar(x + i * width - 0.4 + width / 2, np.nan_to_num(vals), width, yerr=yerr, capsize=3, label=name)
    ax.set_xticks(x, list(groups))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _png(fig)


def line_series(series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str) -> bytes:
    """A few named lines over their index (x-ray statistics per denoising step)."""
    fig, ax = plt.subplots(figsize=(4.5, 2.6))
    for name, vals in series.items():
        ax.plot(range(len(vals)), [_clean(v) for v in vals], marker=".", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _png(fig)
