"""Report rows of the set metrics: KID printed x10^3 (raw in results.json), each row's extractor and N,
a warning when base and candidate values come from different N, and old results.json rows (no
extractor, no reference count) still rendering."""

from __future__ import annotations

import json

import pytest
from _report_helpers import check_report_html, make_fake_run

from harness.eval import layout
from harness.report import html as report_html


def _row(ck: str, role: str, metric: str, name: str, value: float, n: int, **extra) -> dict:
    r = {"checkpoint": ck, "role": role, "step": None, "metric": metric, "metric_name": name, "subset": "domain",
         "value": value, "ci_low": value * 0.9, "ci_high": value * 1.1, "n": n, "higher_is_better": False,
         "diff": None, "diff_ci_low": None, "diff_ci_high": None, "verdict": None, "note": None, **extra}
    if role == "candidate":
        r.update(diff=0.004, diff_ci_low=0.001, diff_ci_high=0.007, verdict="worse")
    return r


def _with_rows(tmp_path, rows: list[dict]):
    run = make_fake_run(tmp_path, hostile_dir=False)
    res = json.loads((run / layout.RESULTS).read_text())
    res["rows"] += rows
    (run / layout.RESULTS).write_text(json.dumps(res))
    return run


def test_kid_is_shown_times_1000_and_rows_name_extractor_and_n(tmp_path):
    ext = "clip:ViT-B-32:openai+resize-crop"
    run = _with_rows(tmp_path, [
        _row("base", "base", "kid_clip", "kid", 0.0123, 64, extractor=ext, n_ref=256),
        _row("cand", "candidate", "kid_clip", "kid", 0.0163, 64, extractor=ext, n_ref=256),
        _row("base", "base", "cmmd", "cmmd", 0.41, 64, extractor="clip:ViT-L-14-336:openai+l2+crop-resize", n_ref=256),
        _row("cand", "candidate", "cmmd", "cmmd", 0.52, 60, extractor="clip:ViT-L-14-336:openai+l2+crop-resize",
             n_ref=256),
    ])
    ctx = report_html.build_context(run)
    kid = next(h for h in ctx["headline"] if h["metric"] == "kid_clip")
    assert kid["base"]["value"] == pytest.approx(12.3) and kid["candidates"][0]["diff"] == pytest.approx(4.0) and kid["unit"] == "×10³"
    assert kid["extractors"] == [ext] and kid["n_ref"] == 256
    assert not any("different N" in n for n in kid["notes"])  # 64 and 64
    cmmd = next(h for h in ctx["headline"] if h["metric"] == "cmmd")
    assert cmmd["base"]["value"] == 0.41 and cmmd["unit"] is None  # only KID is rescaled
    assert any("different N: base 64 images, candidate(s) 60" in n for n in cmmd["notes"])
    raw = json.loads((run / layout.RESULTS).read_text())["rows"]
    assert any(r["metric"] == "kid_clip" and r["value"] == 0.0123 for r in raw)  # results.json keeps the raw value
    html = report_html.render(ctx)
    check_report_html(html, report_html.SECTIONS)
    assert "12.3" in html and "shown ×10³" in html and f"features: {ext}" in html
    assert "N=60" in html and "vs 256 reference images" in html and "compare only at equal N" in html


def test_old_rows_without_extractor_or_n_ref_render(tmp_path):
    run = _with_rows(tmp_path, [_row("base", "base", "kid_clip", "kid", 0.02, 8),
                                _row("cand", "candidate", "kid_clip", "kid", 0.03, 8)])
    ctx = report_html.build_context(run)
    kid = next(h for h in ctx["headline"] if h["metric"] == "kid_clip")
    assert kid["extractors"] == [] and kid["n_ref"] is None and kid["base"]["value"] == pytest.approx(20.0)
    html = report_html.render(ctx)
    check_report_html(html, report_html.SECTIONS)
    assert "features:" not in html and "reference images; N per cell" not in html
