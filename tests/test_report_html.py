"""The report renders from a run folder's files alone: sections, escaping, no remote resources,
and a real browser draws it."""

import numpy as np
import pytest
from _report_helpers import (
    check_report_html,
    chromium_screenshot,
    make_fake_run,
    write_training_run,
)

from harness.errors import HarnessError
from harness.report import html as report_html
from harness.report import plots


@pytest.fixture
def fake_run(tmp_path):
    return make_fake_run(tmp_path)


def test_report_sections_escaping_and_no_remote(fake_run, tmp_path):
    path = report_html.write_report(fake_run, train_run=write_training_run(tmp_path))
    html = path.read_text()
    p = check_report_html(html, report_html.SECTIONS)
    # hostile path of the run dir and checkpoint source are escaped too
    assert "run <b>" not in html
    assert "/models/&lt;script&gt;" in html
    assert 'id="pairs"' in html and html.count('class="thumb') >= 16
    assert p.tags.count("img") > 20
    # the training-curve plot is drawn, not the "no training run" placeholder
    assert "No training run given" not in html
    assert "FAIL" in html and "worse" in html and "better" in html


def test_side_by_side_worst_first(fake_run):
    ctx = report_html.build_context(fake_run)
    clips = [r["sort_clip"] for r in ctx["images"]]
    assert clips == sorted(clips)
    assert all(len(r["cands"]) == 1 and r["base"]["img"].startswith("data:image/jpeg;base64,") for r in ctx["images"])
    domain = [r for r in ctx["images"] if r["subset"] == "domain"]
    assert domain and all(r["reference"] for r in domain)


def test_side_by_side_keeps_the_worst_of_large_runs(fake_run):
    from harness.io import read_jsonl

    per = read_jsonl(fake_run / "per_image.jsonl")
    from _report_helpers import DATA_DIR

    rows, total = report_html._image_rows(fake_run, per, ["cand"], "base", limit=2,
                                          ref_roots=(fake_run.parent / DATA_DIR,))
    assert total == 8 and 2 <= len(rows) <= 6
    worst_clip = sorted(r["clip_score"] for r in per if r["checkpoint"] == "cand")[:2]
    assert sorted(r["sort_clip"] for r in rows)[:2] == worst_clip
    worst_art = sorted((r["artifact_score"] for r in per if r["checkpoint"] == "cand"), reverse=True)[:2]
    assert all(any(r["sort_art"] == a for r in rows) for a in worst_art)


def test_missing_sections_still_present(tmp_path):
    run = make_fake_run(tmp_path, hostile_dir=False)
    import json

    res = json.loads((run / "results.json").read_text())
    for k in ("breakdowns", "surfaces", "grids", "xray", "gates"):
        res[k] = {} if k == "breakdowns" else []
    (run / "results.json").write_text(json.dumps(res))
    (run / "per_image.jsonl").write_text("")
    html = report_html.write_report(run).read_text()
    check_report_html_no_hostile_needed(html)


def check_report_html_no_hostile_needed(html):
    from html.parser import HTMLParser

    ids = set()

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if dict(attrs).get("id"):
                ids.add(dict(attrs)["id"])

    P().feed(html)
    assert {s for s, _ in report_html.SECTIONS} <= ids
    assert "No images were generated." in html and "No x-ray traces" in html


def test_not_a_run_dir(tmp_path):
    with pytest.raises(HarnessError, match="not an eval run folder"):
        report_html.write_report(tmp_path)
    with pytest.raises(HarnessError, match="no metrics.jsonl"):
        report_html.build_context(make_fake_run(tmp_path / "r"), train_run=tmp_path / "nowhere")


def test_plots_are_pngs():
    png = plots.surface_heatmaps([1, 4, 7], [2, 4], {"a": np.ones((2, 3)), "b": np.full((2, 3), np.nan)},
                                 x_label="cfg", y_label="steps", metric="clip", higher_is_better=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.training_curves([{"step": 1}]) is None
    import io

    from PIL import Image

    one = Image.open(io.BytesIO(plots.training_curves([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])))
    three = Image.open(io.BytesIO(plots.training_curves([{"step": 1, "loss": 1.0, "lr": 1e-4},
                                                         {"step": 2, "eval/clip_score": 21.0}])))
    assert three.width > 2.5 * one.width  # loss, learning rate and in-training eval panels
    assert plots.metric_vs_step({"run": [(10, 1.0, 0.5, 1.5), (20, 2.0, float("nan"), 2.5)]},
                                metric="fid", higher_is_better=False)[:4] == b"\x89PNG"


def test_fmt():
    assert report_html.fmt(None) == "–"
    assert report_html.fmt(float("nan")) == "–"
    assert report_html.fmt(3.14159265) == "3.142"


def test_renders_in_headless_chromium(fake_run, tmp_path):
    path = report_html.write_report(fake_run)
    px = chromium_screenshot(path, tmp_path / "shot.png")
    assert px.shape[0] >= 800 and px.shape[1] >= 1100
    assert px.std() > 5.0, "the screenshot is blank"


def test_header_says_no_gates_and_uncomputed_rows_say_why(tmp_path):
    """A suite without gates never reads "all passed"; a metric without a value says "not computed"
    and why, and a gate on it "not evaluated" (never a literal None)."""
    import json

    run = make_fake_run(tmp_path, hostile_dir=False)
    res = json.loads((run / "results.json").read_text())
    res.update(gates=[], gates_passed=None)
    (run / "results.json").write_text(json.dumps(res))
    html = report_html.write_report(run).read_text()
    assert "no gates" in html and "all passed" not in html

    cand = next(r for r in res["rows"] if r["role"] == "candidate" and r["metric"] == "fid_clip")
    cand.update(value=None, ci_low=None, ci_high=None, diff=None, verdict=None, note="needs at least 2 images per set")
    res.update(gates=[{"gate": "fid_clip", "rule": "max", "threshold": 1.0, "checkpoint": "cand", "subset": "domain",
                       "value": None, "passed": False, "evaluated": False, "reason": "needs at least 2 images per set"}],
               gates_passed=None)
    run_json = json.loads((run / "run.json").read_text())
    run_json.setdefault("suite_config", {})["gates"] = {"fid_clip": {"max": 1.0}}
    (run / "run.json").write_text(json.dumps(run_json))
    (run / "results.json").write_text(json.dumps(res))
    html = report_html.write_report(run).read_text()
    assert "not computed: needs at least 2 images per set" in html
    assert "not evaluated: needs at least 2 images per set" in html and "none evaluated" in html
    assert ">None<" not in html and "FAILED" not in html


def test_report_embeds_no_image_from_outside_the_run_and_its_dataset(tmp_path):
    """A per_image.jsonl edited to name a private image (or a 400 MP bomb) outside the run folder."""
    import json

    from PIL import Image

    run = make_fake_run(tmp_path, hostile_dir=False)
    private = tmp_path / "home" / "private.png"
    private.parent.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(private)
    lines = (run / "per_image.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["image"] = str(private)
    (run / "per_image.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    with pytest.raises(HarnessError, match=r"per_image.jsonl: names .*private.png, outside the run folder"):
        report_html.write_report(run)
    assert not (run / "report.html").exists() or "private" not in (run / "report.html").read_text()
