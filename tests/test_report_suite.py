"""Eval suites (schema, identity), run planning, gates and run comparison: no models needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _report_helpers import make_dataset, make_fake_run

from harness.errors import CheckpointError, ConfigError, HarnessError
from harness.eval import gates, plan
from harness.eval.suite import load_suite, suite_identity
from harness.eval.verdict import paired_set_permutation
from harness.report.compare import collect, compare_runs, table

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    (tmp_path / "p.txt").write_text("# comment\na cat\n\na dog\n")
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """
name: t
prompts:
  gen: {file: p.txt}
metrics:
  clip_score: {}
"""


@pytest.mark.parametrize("name", ["quick", "full", "tiny-cpu"])
def test_shipped_suites_load(name):
    s = load_suite(ROOT / "eval" / f"{name}.yaml")
    assert s.name == name and s.metrics and s.prompts
    kinds = {p.kind for p in s.prompts.values()}
    assert kinds == {"generic", "in_domain"}  # every shipped suite measures forgetting


def test_unknown_metric_lists_known(tmp_path):
    p = _write(tmp_path, BASE + "  fidd: {metric: fjd}\n")
    with pytest.raises(ConfigError, match=r"metrics.fidd': unknown metric 'fjd'; known metrics: .*clip_score.*fid"):
        load_suite(p)


@pytest.mark.parametrize("extra,match", [
    ("gates:\n  nope: {min: 1}\n", r"gates.nope': no metric labelled 'nope'"),
    ("gates:\n  clip_score: {subset: gen}\n", r"give at least one of min, max"),
    ("gates:\n  clip_score: {minn: 1}\n", r"unknown key 'gates.clip_score.minn'; did you mean 'min'"),
    ("generation: {width: 60}\n", r"must be divisible by 8"),
    ("seeds: [1, 1]\n", r"seeds repeat"),
    ("generation: {steps: 0}\n", r"generation.steps' = 0: expected a value between 1 and 1000"),
])
def test_bad_suites(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_suite(_write(tmp_path, BASE + extra))


def test_prompt_set_needs_exactly_one_source(tmp_path):
    p = _write(tmp_path, "name: t\nprompts:\n  a: {file: p.txt, heldout: true}\nmetrics: {clip_score: {}}\n")
    with pytest.raises(ConfigError, match="exactly one of 'file', 'prompts' or 'heldout: true'"):
        load_suite(p)
    p = _write(tmp_path, "name: t\nprompts:\n  a: {file: missing.txt}\nmetrics: {clip_score: {}}\n")
    with pytest.raises(ConfigError, match="prompts.a.file' = 'missing.txt': no such file"):
        load_suite(p)


def test_identity_follows_what_is_generated(tmp_path):
    p = _write(tmp_path, BASE)
    s = load_suite(p)
    ident = suite_identity(s, p)
    assert suite_identity(load_suite(p, ["gates.clip_score.min=3", "ci.n_boot=50"]), p)["hash"] == ident["hash"]
    assert suite_identity(load_suite(p, ["ci.n_boot=50"]), p)["full_hash"] != ident["full_hash"]
    assert suite_identity(load_suite(p, ["seeds=[3]"]), p)["hash"] != ident["hash"]
    assert suite_identity(load_suite(p, ["version=2"]), p)["hash"] != ident["hash"]
    (tmp_path / "p.txt").write_text("a cat\na bird\n")
    assert suite_identity(load_suite(p), p)["hash"] != ident["hash"]


def test_prompt_items_and_references(tmp_path):
    data = make_dataset(tmp_path / "data")
    p = _write(tmp_path, """
name: t
seeds: [0, 7]
prompts:
  gen: {file: p.txt}
  inline: {prompts: ["x", "y", "z"], limit: 2}
  dom: {heldout: true, kind: in_domain}
reference: {heldout: true, limit: 3}
metrics: {clip_score: {}}
""")
    s = load_suite(p)
    items = plan.prompt_items(s, p, data)
    assert [(i.subset, i.index, i.seed) for i in items[:4]] == [("gen", 0, 0), ("gen", 0, 7), ("gen", 1, 0),
                                                                  ("gen", 1, 7)]
    assert [i.prompt for i in items if i.subset == "inline"] == ["x", "x", "y", "y"]
    dom = [i for i in items if i.subset == "dom"]
    assert len(dom) == 8 and all(i.reference and Path(i.reference).is_file() for i in dom)
    assert dom[0].prompt.startswith("<script>")  # captions are used verbatim (escaped only in HTML)
    assert len(plan.reference_files(s, p, data)) == 3
    with pytest.raises(ConfigError, match="held-out split.*pass --data"):
        plan.prompt_items(s, p, None)
    (tmp_path / "nodata").mkdir()
    (tmp_path / "nodata" / "a.png").write_bytes((data / "img01.png").read_bytes())
    with pytest.raises(HarnessError, match="no held-out images with captions"):
        plan.prompt_items(s, p, tmp_path / "nodata")


def test_checkpoint_labels_and_steps(tmp_path, tiny_sd_dir):
    ck = plan.checkpoints(str(tiny_sd_dir), [str(tiny_sd_dir), str(tiny_sd_dir)])
    assert [c.label for c in ck] == ["base", "sd", "sd-2"] and [c.role for c in ck] == ["base", "candidate",
                                                                                        "candidate"]
    assert plan.training_step("runs/x/checkpoint-1500") == 1500 and plan.training_step("a/step_20.safetensors") == 20
    assert plan.training_step("runs/final") is None
    with pytest.raises(CheckpointError, match="not found"):
        plan.checkpoints(str(tiny_sd_dir), [str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="at least one --candidate"):
        plan.checkpoints(str(tiny_sd_dir), [])


def test_run_dir_checks(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(HarnessError, match="not an eval run folder; pick a new --out"):
        plan.check_run_dir(tmp_path, {"name": "t", "hash": "x"}, [])
    assert plan.check_run_dir(tmp_path / "new", {"name": "t", "hash": "x"}, []) is None


def _rows(values: dict) -> list[dict]:
    out = []
    for (ck, role, subset), v in values.items():
        out.append({"metric": "fid_clip", "checkpoint": ck, "role": role, "subset": subset, "value": v})
    return out


def test_gates_evaluate():
    p = ROOT / "eval" / "full.yaml"
    s = load_suite(p, ["gates={fid_clip: {max_increase: 2.0}, artifact_score: {max_mean: 1.5}}"])
    ck = [plan.Checkpoint("base", "base", "b"), plan.Checkpoint("a", "candidate", "a"),
          plan.Checkpoint("c", "candidate", "c")]
    rows = _rows({("base", "base", "in_domain"): 10.0, ("a", "candidate", "in_domain"): 11.5,
                  ("c", "candidate", "in_domain"): 12.5})
    res, notes = gates.evaluate(s, rows, ck)
    assert [(g.checkpoint, g.passed) for g in res] == [("a", True), ("c", False)]
    assert res[1].value == pytest.approx(2.5)
    assert "gate 'artifact_score' not evaluated: the metric was skipped" in notes
    text = gates.format_table([g for g in res if not g.passed])
    assert "fid_clip" in text and "FAIL" in text and "max_increase" in text
    # a metric with no value (too few images, ...): "not evaluated", neither a pass nor a FAIL
    rows[2].update(value=None, note="needs at least 2 images per set, got 1")
    res, notes = gates.evaluate(s, rows, ck)
    assert [(g.checkpoint, g.evaluated, g.result) for g in res] == [("a", True, "pass"), ("c", False, "not evaluated")]
    assert res[1].reason == "needs at least 2 images per set, got 1"
    assert any("on c (in_domain) not evaluated: needs at least 2 images" in n for n in notes)
    assert "not evaluated" in gates.format_table(res)
    rows[0]["value"] = None  # a relative gate also needs the base's value
    assert not any(g.evaluated for g in gates.evaluate(s, rows, ck)[0])


def test_paired_set_permutation_identical_candidate_is_exactly_zero():
    rng = np.random.default_rng(0)
    ref, base = rng.normal(size=(20, 4)), rng.normal(size=(12, 4))

    def stat(a, b):
        return float(np.sum((a.mean(0) - b.mean(0)) ** 2))

    assert paired_set_permutation(stat, ref, base, base.copy(), n_perm=50) == (0.0, 0.0, 0.0)
    d, lo, hi = paired_set_permutation(stat, ref, base, base + 3.0, n_perm=200)
    assert d > 0 and 0 < lo < d < hi
    with pytest.raises(ValueError, match="paired rows"):
        paired_set_permutation(stat, ref, base, base[:3])


def test_compare_table_and_steps(tmp_path):
    runs = []
    for step in (100, 200):
        run = make_fake_run(tmp_path / f"s{step}", hostile_dir=False)
        res = json.loads((run / "results.json").read_text())
        for r in res["rows"]:
            if r["role"] == "candidate":
                r["step"] = step
                r["value"] += step / 100
        (run / "results.json").write_text(json.dumps(res))
        runs.append(run)
    df = collect(runs)
    assert sorted(set(df[df.role == "candidate"].x)) == [100.0, 200.0] and set(df[df.role == "base"].x) == {0.0}
    wide = table(df)
    assert list(wide.step) == [0.0, 100.0, 200.0]  # the shared base appears once
    text, written = compare_runs(runs, out=tmp_path / "cmp", metrics=["clip_score"])
    assert "clip_score / generic" in text and "fid_clip" not in text
    assert [p.name for p in written] == ["compare.csv", "compare.html"]
    html = written[1].read_text()
    assert "<script" not in html and html.count("data:image/png;base64,") == 2  # clip_score on two prompt sets


def test_nonfinite_samples_are_marked_and_left_out(tmp_path):
    """A sample whose latents went NaN/Inf (recorded by generation in the PNG) is marked, not scored."""
    from PIL import Image

    from harness.eval import layout, scoring
    from harness.eval.runner import per_image_records
    from harness.generate.batch import make_params, save_png

    items = [plan.Item("gen", i, f"p{i}", 0) for i in range(3)]
    ck = [plan.Checkpoint("base", "base", "b")]
    for it in items:
        save_png(tmp_path / layout.IMAGES / "base" / it.file(), Image.new("RGB", (8, 8)),
                 {**make_params("b", it.prompt, 0), "finite": it.index != 1})
    recs = per_image_records(tmp_path, ck, items)
    assert [r["nonfinite"] for r in recs] == [False, True, False]
    sc = scoring.Scoring(run_dir=tmp_path, suite=load_suite(ROOT / "eval" / "tiny-cpu.yaml"), ckpts=ck, items=items,
                         per_image=recs, reference=[], cache_dir=tmp_path / "cache")
    assert [r["index"] for r in sc.usable("base", "gen")] == [0, 2]
