"""The comparison report: one self-contained HTML file built from a run folder.

Everything the page shows is read from the files ``harness eval`` wrote (see ``layout.py``), so
``harness report RUN_DIR`` can rebuild it at any time. Images and plots are embedded as ``data:``
URIs (thumbnails, so a large suite stays a reasonable size); nothing is fetched from the network
(a Content-Security-Policy forbids it). jinja2 autoescaping is on for the whole template: every
prompt, caption, path and label is escaped, and user text never reaches a ``<script>``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined

from harness.errors import HarnessError
from harness.eval import layout
from harness.io import atomic_write_text, read_jsonl
from harness.report import plots
from harness.report.sweep import strength_sweeps

log = logging.getLogger(__name__)

SECTIONS = (
    ("headline", "Headline"), ("gates", "Gates"), ("images", "Side by side"), ("grids", "Grids"),
    ("xray", "Denoising x-ray"), ("artifacts", "Artifact scores"), ("cluster-kl", "Cluster KL by class"),
    ("training", "Training curves"), ("surfaces", "Metric surfaces"), ("forgetting", "Forgetting check"),
    ("provenance", "Reproduce"),
)
THUMB = 256  # longest side of embedded images, px
MAX_ROWS = 150  # side-by-side rows kept per sort key (worst first) when a suite has more


def fmt(v, digits: int = 4) -> str:
    """A number for a table cell: 4 significant digits; missing or non-finite shown as a dash."""
    if v is None or isinstance(v, str):
        return "–" if v is None else v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "–"
    return f"{f:.{digits}g}"


def data_uri_png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_uri(path: Path | None, max_side: int = THUMB, fmt: str = "JPEG") -> str | None:
    """An image file as a data URI, shrunk to ``max_side`` (JPEG keeps a report of thousands of
    images at megabytes, not gigabytes); None if absent or unreadable."""
    if path is None or not Path(path).is_file():
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((max_side, max_side))
            buf = io.BytesIO()
            if fmt == "PNG":
                im.save(buf, format="PNG", optimize=True)
            else:
                im.save(buf, format="JPEG", quality=88)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # a bomb is refused, not decoded
        log.warning("%s: cannot embed image (%s)", path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _env() -> Environment:
    env = Environment(loader=PackageLoader("harness.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt
    return env


# --- context builders (one per section) -----------------------------------------------------

# How the report prints a metric's value (results.json and gates keep the raw value): papers print KID x 10^3.
DISPLAY_SCALE = {"kid": (1000.0, "×10³")}
# Set statistics whose value depends on N (plug-in FID, KID subsets, CMMD): rows at different N do not compare.
SET_METRICS = ("fid", "fid_clip", "fid_clip_l2", "fid_dinov2", "kid", "cmmd", "prdc")
_SCALED = ("value", "ci_low", "ci_high", "diff", "diff_ci_low", "diff_ci_high")


def _scaled(r: dict | None, scale: float) -> dict | None:
    if r is None or scale == 1.0:
        return r
    return {**r, **{k: r[k] * scale for k in _SCALED if isinstance(r.get(k), (int, float))}}


def _n_note(name: str, base: dict | None, cands: list[dict | None]) -> str | None:
    """A warning when base and a candidate were computed from different numbers of images."""
    if name not in SET_METRICS or not base or not isinstance(base.get("n"), int):
        return None
    other = sorted({c["n"] for c in cands if c and isinstance(c.get("n"), int) and c["n"] != base["n"]})
    if not other:
        return None
    return (f"different N: base {base['n']} images, candidate(s) {', '.join(map(str, other))}; {name} moves with N "
            "(CMMD most), so these values compare only at equal N (the difference uses the paired images)")


def _headline(results: dict) -> list[dict]:
    rows = results.get("rows", [])
    cands = [c["label"] for c in results.get("checkpoints", []) if c["role"] == "candidate"]
    by_key: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    order: list[tuple[str, str]] = []
    for r in rows:
        key = (r["metric"], r["subset"])
        if key not in by_key:
            order.append(key)
        by_key[key][r["checkpoint"]] = r
    out = []
    for key in order:
        cells = by_key[key]
        base = next((r for r in cells.values() if r.get("role") == "base"), None)
        any_row = next(iter(cells.values()))
        name = any_row.get("metric_name", key[0])
        scale, unit = DISPLAY_SCALE.get(name, (1.0, None))
        notes = sorted({r["note"] for r in cells.values() if r.get("note")})
        n_note = _n_note(name, base, [cells.get(c) for c in cands])
        out.append({
            "metric": key[0], "subset": key[1], "metric_name": name, "unit": unit,
            "higher_is_better": any_row.get("higher_is_better"), "base": _scaled(base, scale),
            "candidates": [_scaled(cells.get(c), scale) for c in cands],
            # rows written before rows named their extractor / reference count simply show none
            "extractors": sorted({r["extractor"] for r in cells.values() if r.get("extractor")}),
            "n_ref": any_row.get("n_ref"), "notes": notes + ([n_note] if n_note else []),
        })
    return out


def _image_rows(run_dir: Path, per_image: list[dict], cands: list[str], base_label: str,
                limit: int = MAX_ROWS, ref_roots: tuple = ()) -> tuple[list[dict], int]:
    """Rows of (prompt, seed) with every checkpoint's image; beyond ``limit`` rows only the worst
    ``limit`` by each sort key are kept (the page must stay loadable). Returns (rows, total).
    Reference images may come from ``ref_roots`` (the run's dataset); every other image from the run."""
    by = defaultdict(dict)
    for r in per_image:
        by[(r["subset"], r["index"], r["seed"])][r["checkpoint"]] = r
    rows = []
    for (subset, index, seed), cells in by.items():
        base = cells.get(base_label)
        first = base or next(iter(cells.values()))
        row = {"order": len(rows), "subset": subset, "index": index, "seed": seed, "prompt": first.get("prompt", ""),
               "base": base, "cands": [cells.get(c) for c in cands], "reference_path": first.get("reference")}
        lead = next((c for c in row["cands"] if c), None) or base or {}
        row["sort_clip"] = _num(lead.get("clip_score"))
        row["sort_art"] = _num(lead.get("artifact_score"))
        row["sort_dclip"] = (row["sort_clip"] - _num(base.get("clip_score"))
                             if base and row["sort_clip"] is not None and _num(base.get("clip_score")) is not None
                             else None)
        rows.append(row)
    total = len(rows)
    # Worst first: lowest CLIP score, highest artifact score, largest CLIP drop.
    keys = [lambda r: _key(r["sort_clip"]), lambda r: _key(r["sort_art"], worst_high=True),
            lambda r: _key(r["sort_dclip"])]
    if total > limit:
        keep = {id(r) for k in keys for r in sorted(rows, key=k)[:limit]}
        rows = [r for r in rows if id(r) in keep]
    rows.sort(key=keys[0])
    for row in rows:
        row["base"] = _cell(run_dir, row["base"])
        row["cands"] = [_cell(run_dir, c) for c in row["cands"]]
        ref = row["reference_path"]
        row["reference"] = _reference_uri(run_dir, ref, ref_roots) if ref else None
    return rows, total


def _reference_uri(run_dir: Path, ref: str, roots: tuple) -> str | None:
    """A reference thumbnail only from the run's dataset; one from anywhere else is left out (warned)."""
    try:
        return image_uri(layout.resolve(run_dir, ref, within=roots))
    except HarnessError as e:
        log.warning("%s", e)
        return None


def _num(v) -> float | None:
    return float(v) if _ok(v) else None


def _key(v, worst_high: bool = False) -> tuple[bool, float]:
    """Sort key putting missing values last."""
    if v is None:
        return (True, 0.0)
    return (False, -v if worst_high else v)


def _ok(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _cell(run_dir: Path, r: dict | None) -> dict | None:
    if r is None:
        return None
    return {
        "img": image_uri(layout.resolve(run_dir, r.get("image"))), "path": r.get("image"),
        "clip": r.get("clip_score"), "art": r.get("artifact_score"), "nonfinite": bool(r.get("nonfinite")),
        "heatmap": image_uri(layout.resolve(run_dir, r["heatmap"])) if r.get("heatmap") else None,
    }


def _artifacts(run_dir: Path, per_image: list[dict], labels: list[str], limit: int = 12) -> dict:
    scored = [r for r in per_image if _ok(r.get("artifact_score"))]
    if not scored:
        return {"available": False}
    series = {lab: [r["artifact_score"] for r in scored if r["checkpoint"] == lab] for lab in labels}
    groups = sorted({r["subset"] for r in scored})
    means = {lab: [float(np.mean([r["artifact_score"] for r in scored if r["checkpoint"] == lab and r["subset"] == g]
                                 or [math.nan])) for g in groups] for lab in labels}
    worst = sorted(scored, key=lambda r: -r["artifact_score"])[:limit]
    return {
        "available": True,
        "plot": data_uri_png(plots.grouped_bars(groups, means, ylabel="mean artifact score")),
        "summary": [{"checkpoint": lab, "n": len(v), "mean": float(np.mean(v)) if v else None,
                     "max": float(np.max(v)) if v else None} for lab, v in series.items()],
        "worst": [{"checkpoint": r["checkpoint"], "subset": r["subset"], "prompt": r.get("prompt", ""),
                   "seed": r["seed"], "score": r["artifact_score"], **_cell(run_dir, r)} for r in worst],
    }


def _cluster(results: dict) -> list[dict]:
    out = []
    for label, per_ckpt in results.get("breakdowns", {}).items():
        for ckpt, rows in per_ckpt.items():
            cols: list[str] = []
            for r in rows:
                cols += [k for k in r if k not in cols]
            out.append({"metric": label, "checkpoint": ckpt, "columns": cols, "rows": rows})
    return out


def _grids(run_dir: Path, results: dict) -> list[dict]:
    out = []
    for g in results.get("grids", []):
        pages = [image_uri(layout.resolve(run_dir, p), max_side=1600, fmt="PNG") for p in g.get("pages", [])]
        out.append({**g, "page_uris": [p for p in pages if p]})
    return out


def _xray(run_dir: Path, results: dict) -> list[dict]:
    out = []
    for x in results.get("xray", []):
        stats = x.get("stats") or {}
        plot = data_uri_png(plots.line_series(stats, xlabel="denoising step", ylabel="value")) if stats else None
        out.append({**x, "strip_uri": image_uri(layout.resolve(run_dir, x.get("strip")), max_side=2400, fmt="PNG"),
                    "plot": plot})
    return out


def _surfaces(results: dict) -> list[dict]:
    out = []
    for s in results.get("surfaces", []):
        for metric, hib in (("clip_score", True), ("artifact_score", False)):
            grids = {ck: np.array(v, dtype=float) for ck, v in s.get(metric, {}).items()}
            if not grids or all(not np.isfinite(g).any() for g in grids.values()):
                continue
            png = plots.surface_heatmaps(s["x_values"], s["y_values"], grids, x_label=s["x_axis"],
                                         y_label=s["y_axis"], metric=metric, higher_is_better=hib)
            out.append({"grid": s["grid"], "metric": metric, "plot": data_uri_png(png)})
    return out


def _forgetting(results: dict, suite: dict) -> dict:
    kinds = {name: ps.get("kind", "generic") for name, ps in suite.get("prompts", {}).items()}
    rows = [r for r in results.get("rows", []) if r["subset"] in kinds]
    if not rows or len(set(kinds.values())) < 2:
        present = sorted(set(kinds.values()))
        return {"available": False, "kinds": present, "rows": rows and _headline({**results, "rows": rows})}
    table = _headline({**results, "rows": rows})
    for t in table:
        t["kind"] = kinds[t["subset"]]
    plots_ = []
    for metric in dict.fromkeys(r["metric"] for r in rows):
        sub = [r for r in rows if r["metric"] == metric]
        groups = list(dict.fromkeys(f"{r['subset']} ({kinds[r['subset']]})" for r in sub))
        labels = list(dict.fromkeys(r["checkpoint"] for r in sub))
        series, errs = {}, {}
        for lab in labels:
            vals, ci = [], []
            for g in groups:
                r = next((x for x in sub if x["checkpoint"] == lab and f"{x['subset']} ({kinds[x['subset']]})" == g), {})
                vals.append(r.get("value"))
                ci.append((r.get("ci_low"), r.get("ci_high")))
            series[lab], errs[lab] = vals, ci
        plots_.append({"metric": metric, "plot": data_uri_png(plots.grouped_bars(groups, series, ylabel=metric,
                                                                                errors=errs))})
    return {"available": True, "table": table, "plots": plots_}


def _training(train_run: Path | None) -> dict | None:
    if train_run is None:
        return None
    f = Path(train_run) / "metrics.jsonl" if Path(train_run).is_dir() else Path(train_run)
    if not f.is_file():
        raise HarnessError(f"{train_run}: no metrics.jsonl there (expected a training run folder)")
    records = read_jsonl(f)
    png = plots.training_curves(records)
    return {"path": str(f), "n": len(records), "plot": data_uri_png(png) if png else None,
            "last": records[-1] if records else None}


def build_context(run_dir: str | Path, train_run: str | Path | None = None) -> dict:
    run_dir = Path(run_dir)
    run = layout.read_run(run_dir)
    results = layout.read_results(run_dir)
    per_image = read_jsonl(run_dir / layout.PER_IMAGE)
    suite = run.get("suite_config", {})
    ckpts = results.get("checkpoints") or run.get("checkpoints", [])
    base_label = next((c["label"] for c in ckpts if c["role"] == "base"), "base")
    cands = [c["label"] for c in ckpts if c["role"] == "candidate"]
    prov = results.get("provenance") or run.get("provenance", {})
    images, images_total = _image_rows(run_dir, per_image, cands, base_label,
                                       ref_roots=(run["data"],) if run.get("data") else ())
    sweep = strength_sweeps({**results, "checkpoints": ckpts})
    sections = SECTIONS[:1] + ((("sweep", "Strength sweep"),) if sweep else ()) + SECTIONS[1:]
    return {
        "title": f"{run['suite']['name']}: {', '.join(cands)} vs {base_label}",
        "sections": sections, "sweep": sweep, "suite": run["suite"], "suite_config": suite, "checkpoints": ckpts,
        "base_label": base_label, "candidates": cands,
        "headline": _headline(results), "gates": results.get("gates", []),
        "gates_passed": results.get("gates_passed"), "notes": results.get("notes", []),
        "gates_not_evaluated": sum(not g.get("evaluated", True) for g in results.get("gates", [])),
        "images": images, "images_total": images_total,
        "grids": _grids(run_dir, results), "xray": _xray(run_dir, results),
        "artifacts": _artifacts(run_dir, per_image, [base_label, *cands]),
        "cluster": _cluster(results), "training": _training(train_run),
        "surfaces": _surfaces(results), "forgetting": _forgetting(results, suite),
        "provenance": prov, "run": run,
        "run_json": json.dumps({k: run.get(k) for k in ("suite", "seeds", "generation", "data")}, indent=1,
                               default=str),
    }


def render(context: dict) -> str:
    return _env().get_template("report.html.j2").render(**context)


def write_report(run_dir: str | Path, train_run: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Render ``RUN_DIR/report.html`` (or ``out``) from the run folder's files."""
    run_dir = Path(run_dir)
    html = render(build_context(run_dir, train_run))
    path = Path(out) if out else run_dir / layout.REPORT
    atomic_write_text(path, html)
    log.info("report written to %s", path)
    return path
