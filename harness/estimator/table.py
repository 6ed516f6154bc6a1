"""Reading ratings tables (CSV, Parquet, JSONL) into one shape: image, rating, n_ratings, group, prompt, seed.

Layouts read directly (``layout="auto"`` picks by columns):

* ``generic`` - one row per image: ``image`` (path, relative to the table's folder or ``images_root``),
  ``rating``; optional ``prompt``, ``seed``, ``group`` (rows of one group stay on one side of the
  held-out split) and ``user`` (then rows are per-rater ratings, aggregated like AI-Horde's).
* ``ai-horde`` - the AI-Horde ratings export (``diffusiondb_export.parquet``, one row per rating):
  ``image_uuid`` (the DiffusionDB file name without extension), ``artifacts`` (0-5, 0 = none,
  5 = ruined), ``rating`` (aesthetic 1-10, ignored here), ``user_id`` (hashed rater), ``kudos``
  (-50 marks an anonymous rating), ``ratings_count``, ``account_age``, ``usage_requests``,
  ``created_at``, ``client_agent``, ``trusted``. Images are looked up as
  ``images_root/<uuid>.{png,webp,jpg}``, or via DiffusionDB's metadata (next item).
* ``diffusiondb`` metadata (``metadata.parquet``, passed as ``metadata=``): ``image_name``, ``prompt``,
  ``part_id``, ``seed``, ``step``, ``cfg``, ``sampler``, ``width``, ``height``, ... - supplies prompt
  and seed, and the path ``images_root/part-{part_id:06d}/{image_name}``.

Per-rater rows are filtered *before* aggregating, on the same frame that is then grouped (the seed
project's filters were computed and then silently discarded by a later groupby on the raw table):
anonymous ratings dropped, one rating per (image, rater) kept (the latest), then images with at
least ``min_ratings`` ratings keep the median.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "generic", "ai-horde")
GENERIC_REQUIRED = ("image", "rating")
HORDE_REQUIRED = ("image_uuid", "artifacts", "user_id")
HORDE_ANONYMOUS_KUDOS = -50
IMAGE_EXTS = (".png", ".webp", ".jpg", ".jpeg")
OUT_COLUMNS = ["image", "rating", "n_ratings", "group", "prompt", "seed"]


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV, Parquet or JSON-lines file as a DataFrame (by extension)."""
    p = Path(path)
    if not p.exists():
        raise HarnessError(f"{p}: ratings table not found")
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(p)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(p)
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(p, lines=True)
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise HarnessError(f"{p}: cannot read it as {suffix[1:]} ({str(e).splitlines()[0]})") from e
    raise HarnessError(f"{p}: unknown table format {suffix!r}; expected .csv, .parquet or .jsonl")


def _require(df: pd.DataFrame, cols: Sequence[str], where: str, layout: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise HarnessError(f"{where}: missing column(s) {missing} for layout '{layout}': expected "
                           f"{list(cols)} (plus optional ones), found {list(df.columns)}")


def detect_layout(df: pd.DataFrame) -> str:
    if all(c in df.columns for c in HORDE_REQUIRED):
        return "ai-horde"
    return "generic"


def _check_scale(values: pd.Series, scale: tuple[float, float], where: str, column: str) -> None:
    num = pd.to_numeric(values, errors="coerce")
    bad = num.isna() | (num < scale[0]) | (num > scale[1])
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        v = values.iloc[i]
        v = v.item() if hasattr(v, "item") else v
        raise HarnessError(f"{where}: column '{column}' row {i + 1} = {v!r} is outside the declared "
                           f"scale {scale[0]}..{scale[1]} ({int(bad.sum())} such row(s))")


def aggregate_raters(df: pd.DataFrame, *, image: str, rating: str, user: str, min_ratings: int,
                     anonymous: pd.Series | None = None, order: str | None = None) -> pd.DataFrame:
    """Per-rater rows -> one row per image (median rating, n_ratings), filters applied first."""
    rows = df
    if anonymous is not None:
        rows = rows[~anonymous.loc[rows.index]]
    if order is not None and order in rows.columns:
        rows = rows.sort_values(order, kind="stable")
    rows = rows.drop_duplicates(subset=[image, user], keep="last")  # one vote per rater per image
    grouped = rows.groupby(image, sort=False)[rating].agg(["median", "size"])
    kept = grouped[grouped["size"] >= min_ratings]
    log.info("ratings: %d rows -> %d after rater filters -> %d images with >= %d ratings", len(df), len(rows),
             len(kept), min_ratings)
    return pd.DataFrame({image: kept.index, "rating": kept["median"].to_numpy(),
                         "n_ratings": kept["size"].to_numpy()})


def _resolve(names: pd.Series, root: Path, lookup: dict[str, str] | None) -> list[Path]:
    out = []
    for n in names.astype(str):
        if lookup is not None and n in lookup:
            out.append(root / lookup[n])
            continue
        p = Path(n)
        p = p if p.is_absolute() else root / p
        if not p.suffix:
            p = next((p.with_suffix(e) for e in IMAGE_EXTS if p.with_suffix(e).exists()), p.with_suffix(".png"))
        out.append(p)
    return out


def _diffusiondb_lookup(metadata: str | Path) -> tuple[dict[str, str], pd.DataFrame]:
    meta = read_table(metadata)
    _require(meta, ("image_name", "part_id"), str(metadata), "diffusiondb")
    stem = meta["image_name"].astype(str).str.rsplit(".", n=1).str[0]
    rel = [f"part-{int(p):06d}/{n}" for p, n in zip(meta["part_id"], meta["image_name"])]
    meta = meta.assign(_stem=stem)
    return dict(zip(stem, rel)), meta.set_index("_stem")


def read_ratings(path: str | Path, *, layout: str = "auto", images_root: str | Path | None = None,
                 metadata: str | Path | None = None, scale: tuple[float, float] = (0, 5), min_ratings: int = 3,
                 drop_anonymous: bool = True, missing: str = "error", duplicates: str = "error") -> pd.DataFrame:
    """Read a ratings table into columns ``image`` (absolute path), ``rating``, ``n_ratings``, ``group``,
    ``prompt``, ``seed``.

    ``missing``: "error" (default) or "drop" images whose file does not exist. ``duplicates`` (generic
    layout without raters): identical repeated rows are always collapsed; conflicting ratings for one
    image are an "error" (default) or resolved by their "median"."""
    if layout not in LAYOUTS:
        raise HarnessError(f"layout: unknown {layout!r}; known: {', '.join(LAYOUTS)}")
    if missing not in ("error", "drop") or duplicates not in ("error", "median"):
        raise HarnessError(f"missing/duplicates: expected 'error'|'drop' and 'error'|'median', got "
                           f"{missing!r}, {duplicates!r}")
    where = str(path)
    df = read_table(path)
    if df.empty:
        raise HarnessError(f"{where}: the table has no rows")
    layout = detect_layout(df) if layout == "auto" else layout
    root = Path(images_root) if images_root else Path(path).parent
    lookup, meta = _diffusiondb_lookup(metadata) if metadata else (None, None)
    if layout == "ai-horde":
        _require(df, HORDE_REQUIRED, where, layout)
        _check_scale(df["artifacts"], scale, where, "artifacts")
        anon = (df["kudos"] == HORDE_ANONYMOUS_KUDOS) if drop_anonymous and "kudos" in df.columns else None
        agg = aggregate_raters(df, image="image_uuid", rating="artifacts", user="user_id", min_ratings=min_ratings,
                               anonymous=anon, order="created_at")
        names = agg["image_uuid"]
        extra = pd.DataFrame(index=agg.index)
    else:
        _require(df, GENERIC_REQUIRED, where, layout)
        _check_scale(df["rating"], scale, where, "rating")
        df = df.assign(rating=pd.to_numeric(df["rating"]))
        if "user" in df.columns:
            agg = aggregate_raters(df, image="image", rating="rating", user="user", min_ratings=min_ratings)
            firsts = df.drop_duplicates("image").set_index("image")
            extra = firsts.reindex(agg["image"]).reset_index(drop=True)
        else:
            agg = _collapse_duplicates(df, where, duplicates)
            extra = agg
        names = agg["image"]
    out = pd.DataFrame({"image": _resolve(names, root, lookup), "rating": agg["rating"].astype(float).to_numpy(),
                        "n_ratings": agg.get("n_ratings", pd.Series([1] * len(agg))).to_numpy()})
    for col in ("group", "prompt", "seed"):
        out[col] = extra[col].to_numpy() if col in extra.columns else None
    if meta is not None:
        hit = meta.reindex(names.astype(str).to_numpy())
        for col in ("prompt", "seed"):
            if col in hit.columns:
                out[col] = out[col].where(out[col].notna(), hit[col].to_numpy())
    out["group"] = [str(g) if g is not None and not pd.isna(g) else str(p) for g, p in zip(out["group"], out["image"])]
    out = _check_files(out, where, missing)
    if out.empty:
        raise HarnessError(f"{where}: no images left after filtering (min_ratings={min_ratings})")
    return out[OUT_COLUMNS].reset_index(drop=True)


def _collapse_duplicates(df: pd.DataFrame, where: str, duplicates: str) -> pd.DataFrame:
    exact = df.duplicated(keep="first")
    if exact.any():
        log.warning("%s: dropping %d exactly repeated row(s)", where, int(exact.sum()))
        df = df[~exact]
    counts = df.groupby("image")["rating"].nunique()
    conflicting = counts[counts > 1]
    if len(conflicting):
        if duplicates == "error":
            first = conflicting.index[0]
            vals = sorted(df.loc[df["image"] == first, "rating"].tolist())
            raise HarnessError(f"{where}: image {first!r} appears with different ratings {vals} "
                               f"({len(conflicting)} such image(s)); pass duplicates='median' to combine them")
        med = df.groupby("image", sort=False)["rating"].median()
        df = df.drop_duplicates("image", keep="first").assign(rating=lambda d: d["image"].map(med))
    else:
        df = df.drop_duplicates("image", keep="first")
    return df.reset_index(drop=True)


def _check_files(out: pd.DataFrame, where: str, missing: str) -> pd.DataFrame:
    exists = [Path(p).is_file() for p in out["image"]]
    gone = [str(p) for p, e in zip(out["image"], exists) if not e]
    if gone:
        if missing == "error":
            raise HarnessError(f"{where}: {len(gone)} image file(s) not found, e.g. {gone[0]} "
                               "(pass missing='drop' to skip them)")
        log.warning("%s: dropping %d row(s) whose image file is missing, e.g. %s", where, len(gone), gone[0])
        out = out[exists]
    out = out.assign(image=[str(Path(p).resolve()) for p in out["image"]])
    return out
