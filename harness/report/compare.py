"""``harness compare RUN_DIR...``: several eval runs in one table and a metric-vs-step plot.

Typical use: one eval run per checkpoint of a training run (checkpoint-500, checkpoint-1000, ...),
to pick the last checkpoint before the fine-tune "looks burnt". The step comes from the checkpoint's
name (``checkpoint-500``, ``step_500``); a ``BASE::LORA@SCALE`` candidate without one by its LoRA scale (one
eval run per strength); others by their order on the command line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from harness.eval import layout
from harness.io import atomic_write_text
from harness.report import plots

log = logging.getLogger(__name__)


def collect(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """All runs' tidy rows with a ``run`` column and each checkpoint's ``lora_scale`` (``BASE::LORA@SCALE``
    candidates); a candidate is placed at its step, else its LoRA scale, else its run's position."""
    frames = []
    for i, d in enumerate(run_dirs):
        res = layout.read_results(d)
        df = pd.DataFrame(res.get("rows", []), columns=list(layout.TABLE_COLUMNS))
        df.insert(0, "run", str(d))
        df.insert(1, "run_index", i)
        scales = {c.get("label"): c.get("lora_scale") for c in res.get("checkpoints", [])}
        df["lora_scale"] = df["checkpoint"].map(scales).astype("float64")
        frames.append(df)
    if not frames:
        raise HarnessError("compare: give at least one run folder")
    df = pd.concat(frames, ignore_index=True)
    step = df["step"].astype("float64")
    df["x"] = step.where(step.notna(), df["lora_scale"].where(df["lora_scale"].notna(),
                                                               df["run_index"].astype("float64")))
    df.loc[df["role"] == "base", "x"] = 0.0
    return df


def x_label(df: pd.DataFrame) -> str:
    """What the x of the candidates is: their training step, their LoRA scale, or their run's position."""
    cand = df[df["role"] != "base"]
    if len(cand) and cand["step"].isna().all() and cand["lora_scale"].notna().all():
        return "LoRA scale"
    return "training step"


def table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, checkpoint); one column per metric and prompt set: 'value [lo, hi]'."""
    def cell(r) -> str:
        if pd.isna(r["value"]):
            return "–"
        ci = "" if pd.isna(r["ci_low"]) else f" [{r['ci_low']:.4g}, {r['ci_high']:.4g}]"
        verdict = f" {r['verdict']}" if isinstance(r["verdict"], str) else ""
        return f"{r['value']:.4g}{ci}{verdict}"

    label = "lora_scale" if x_label(df) == "LoRA scale" else "step"
    df = df.assign(col=df["metric"] + " / " + df["subset"], cell=df.apply(cell, axis=1))
    # the base model appears once, however many runs share it
    base = df[df["role"] == "base"].drop_duplicates(["checkpoint", "col"])
    wide = pd.concat([base, df[df["role"] != "base"]]).pivot_table(
        index=["run_index", "checkpoint", "x"], columns="col", values="cell", aggfunc="first")
    wide = wide.reset_index().sort_values(["x", "run_index"]).rename(columns={"x": label})
    return wide.drop(columns=["run_index"]).drop_duplicates(subset=["checkpoint", label])


def step_plots(df: pd.DataFrame) -> list[tuple[str, bytes]]:
    out = []
    for (metric, subset), g in df.groupby(["metric", "subset"], sort=False):
        cand = g[g["role"] != "base"]
        if cand.empty:
            continue
        series = {"candidates": [(r.x, r.value, r.ci_low, r.ci_high) for r in cand.itertuples()]}
        base = g[g["role"] == "base"]
        if not base.empty:
            b = base.iloc[0]
            xs = sorted({0.0, *cand["x"].tolist()})
            series["base"] = [(x, b.value, b.ci_low, b.ci_high) for x in xs]
        hib = g["higher_is_better"].dropna()
        png = plots.metric_vs_step(series, metric=f"{metric} ({subset})", xlabel=x_label(df),
                                   higher_is_better=bool(hib.iloc[0]) if len(hib) else None)
        out.append((f"{metric} / {subset}", png))
    return out


def compare_runs(run_dirs: Sequence[str | Path], *, out: str | Path | None = None,
                 metrics: Sequence[str] | None = None) -> tuple[str, list[Path]]:
    """Returns the table as text and the files written into ``out`` (compare.csv, compare.html)."""
    df = collect(run_dirs)
    if metrics:
        unknown = sorted(set(metrics) - set(df["metric"]))
        if unknown:
            raise HarnessError(f"compare: metric(s) {unknown} not in these runs; they have "
                               f"{', '.join(sorted(set(df['metric'])))}")
        df = df[df["metric"].isin(metrics)]
    wide = table(df)
    text = wide.to_string(index=False)
    written: list[Path] = []
    if out is not None:
        out = Path(out)
        written.append(atomic_write_text(out / "compare.csv", df.drop(columns=["x"]).to_csv(index=False)))
        written.append(atomic_write_text(out / "compare.html", render(wide, step_plots(df), run_dirs)))
    return text, written


def render(wide: pd.DataFrame, figures: list[tuple[str, bytes]], run_dirs) -> str:
    from harness.report.html import _env, data_uri_png

    return _env().get_template("compare.html.j2").render(
        columns=[str(c) for c in wide.columns], rows=[[("" if pd.isna(v) else v) for v in r]
                                                      for r in wide.itertuples(index=False)],
        figures=[(name, data_uri_png(png)) for name, png in figures], runs=[str(d) for d in run_dirs])
