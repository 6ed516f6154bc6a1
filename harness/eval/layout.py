"""The run folder ``harness eval`` writes, and the readers the report and ``harness compare`` use.

::

    RUN_DIR/
      run.json            suite identity (name, version, hash), checkpoints (label, role, source,
                          sha256), --data, seeds, generation settings, provenance; written first
      suite.yaml          the resolved suite (after --set overrides)
      prompts.jsonl       one line per (prompt set, prompt, seed): subset, index, seed, prompt, reference
      images/LABEL/SUBSET/  generated PNGs (with generations.jsonl) per checkpoint and prompt set
      per_image.jsonl     per generated image: checkpoint, subset, index, seed, prompt, image,
                          reference, clip_score, artifact_score, heatmap, nonfinite
      heatmaps/LABEL/     artifact heatmaps (PNG)
      grids/LABEL/NAME/   grid pages (PNG) and grid.json from harness.generate
      xray/LABEL/N/       x-ray strip and trace
      cache/              reference features and other reusable intermediates
      results.json        headline numbers (schema below), gates, breakdowns, surfaces, provenance
      results.csv / results.parquet   the tidy table: one row per checkpoint x metric x subset
      report.html         the self-contained report

Paths stored inside these files are relative to RUN_DIR when they lie inside it, absolute otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.errors import HarnessError

RUN = "run.json"
SUITE = "suite.yaml"
PROMPTS = "prompts.jsonl"
PER_IMAGE = "per_image.jsonl"
RESULTS = "results.json"
TABLE_CSV = "results.csv"
TABLE_PARQUET = "results.parquet"
REPORT = "report.html"
IMAGES = "images"
GRIDS = "grids"
XRAY = "xray"
HEATMAPS = "heatmaps"
CACHE = "cache"

RUN_SCHEMA = "harness.eval.run/1"
RESULTS_SCHEMA = "harness.eval.results/1"

# Columns of the tidy table, in order (results.json "rows" holds the same records).
TABLE_COLUMNS = (
    "checkpoint", "role", "step", "metric", "metric_name", "subset", "value", "ci_low", "ci_high", "n",
    "higher_is_better", "diff", "diff_ci_low", "diff_ci_high", "verdict", "note",
)


def rel(run_dir: Path, path: str | Path) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        return str(p.resolve())


def resolve(run_dir: Path, path: str | Path | None, *, within: tuple = ()) -> Path | None:
    """A path a run folder's tables name, which must lie inside the run folder (or one of ``within``,
    e.g. the dataset a reference image comes from): a table edited to name ``/home/me/private.png``
    must not pull that file into a report. Symlinks are followed before the check."""
    if path is None:
        return None
    p = Path(path)
    p = p if p.is_absolute() else Path(run_dir) / p
    real = p.resolve()
    if not any(real.is_relative_to(Path(r).resolve()) for r in (run_dir, *within) if r):
        raise HarnessError(f"{Path(run_dir) / PER_IMAGE}: names {path}, outside the run folder"
                           f"{' and the dataset' if within else ''}; refusing to read it")
    return p


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise HarnessError(f"{path.parent}: not an eval run folder (no {path.name}; {what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HarnessError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HarnessError(f"{path}: expected a JSON object")
    return data


def read_run(run_dir: str | Path) -> dict:
    data = _read_json(Path(run_dir) / RUN, "run 'harness eval' first")
    if data.get("schema") != RUN_SCHEMA:
        raise HarnessError(f"{Path(run_dir) / RUN}: schema {data.get('schema')!r}, expected {RUN_SCHEMA!r}")
    return data


def read_results(run_dir: str | Path) -> dict:
    data = _read_json(Path(run_dir) / RESULTS, "the eval did not finish; rerun it to resume")
    if data.get("schema") != RESULTS_SCHEMA:
        raise HarnessError(f"{Path(run_dir) / RESULTS}: schema {data.get('schema')!r}, expected {RESULTS_SCHEMA!r}")
    return data
