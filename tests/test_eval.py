"""``harness eval`` end to end on the tiny model zoo: report, escaping, gates, resume, two processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from _report_helpers import (
    HOSTILE_DIR,
    check_report_html,
    chromium_screenshot,
    make_dataset,
    perturbed_copy,
    strip_provenance,
    untrained_estimator,
)
from _train_helpers import free_port

from harness.cli import main as cli_main
from harness.errors import CheckpointError, HarnessError
from harness.eval import layout
from harness.report import html as report_html

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "eval" / "tiny-cpu.yaml"


def _overrides(s: dict) -> list[str]:
    # conf 0: the zoo's random detector scores its boxes ~0.001; keep them all so the cluster KL has crops
    zoo = s["zoo"]
    return [f"models.clip={zoo / 'clip'}", f"models.detector={zoo / 'yolo'}", f"models.estimator={s['estimator']}",
            "metrics.cluster_kl.settings.conf=0.0", "metrics.cluster_kl.settings.imgsz=64",
            "metrics.artifact_score.settings.heatmaps=2"]


@pytest.fixture(scope="module")
def setup(zoo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = make_dataset(root / HOSTILE_DIR)
    cand = perturbed_copy(zoo_dir / "sd", root / "ft" / "checkpoint-100")
    est = untrained_estimator(zoo_dir, root / "estimator")
    return {"root": root, "data": data, "cand": cand, "zoo": zoo_dir, "estimator": est}


def _eval_args(s, out: Path, *extra: str) -> list[str]:
    args = ["eval", str(SUITE), "--base", str(s["zoo"] / "sd"), "--candidate", str(s["cand"]), "--data",
            str(s["data"]), "--out", str(out)]
    for o in _overrides(s):
        args += ["--set", o]
    return args + list(extra)


@pytest.fixture(scope="module")
def run(setup):
    """One eval run, in this process, single-threaded (so the two-process run can match it bit for bit)."""
    import torch

    from harness.report.evaluate import run_eval

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = setup["root"] / "run"
        res = run_eval(SUITE, base=str(setup["zoo"] / "sd"), candidates=[str(setup["cand"])], out=out,
                       data=setup["data"], overrides=_overrides(setup), progress=False)
    finally:
        torch.set_num_threads(threads)
    return res


@pytest.mark.slow
def test_eval_writes_results_table_and_report(run, setup, tmp_path):
    res = run
    assert res.exit_code == 0 and res.generated == 28 and res.skipped == 0
    results = json.loads((res.run_dir / layout.RESULTS).read_text())
    labels = [c["label"] for c in results["checkpoints"]]
    assert labels == ["base", "ft-checkpoint-100"] and results["checkpoints"][1]["step"] == 100
    df = pd.read_parquet(res.run_dir / layout.TABLE_PARQUET)
    csv = pd.read_csv(res.run_dir / layout.TABLE_CSV)
    assert list(df.columns) == list(csv.columns) == list(layout.TABLE_COLUMNS) and len(df) == len(csv)
    assert df.value.tolist() == pytest.approx(csv.value.tolist(), nan_ok=True)
    # one row per checkpoint x metric x subset; CLIP score on both prompt sets, set metrics in-domain only
    keys = set(zip(df.checkpoint, df.metric, df.subset))
    assert len(keys) == len(df)
    for ck in labels:
        assert {(ck, "clip_score", "generic"), (ck, "clip_score", "in_domain"), (ck, "kid_clip", "in_domain"),
                (ck, "fid_clip", "in_domain"), (ck, "cmmd", "in_domain"), (ck, "cluster_kl", "in_domain"),
                (ck, "artifact_score", "generic"), (ck, "artifact_score", "in_domain")} <= keys
    clip = df[(df.metric == "clip_score") & (df.checkpoint == labels[1])]
    assert clip.ci_low.notna().all() and (clip.ci_low <= clip.value).all() and (clip.value <= clip.ci_high).all()
    assert set(clip.verdict) <= {"better", "worse", "inconclusive"}
    # too few reference images for FID: said, with KID pointed to
    assert any("FID needs more images" in n and "kid_clip" in n for n in results["notes"])
    # the perturbed candidate really differs: its in-domain CLIP scores are not the base's
    per = [json.loads(x) for x in (res.run_dir / layout.PER_IMAGE).read_text().splitlines()]
    b = [r["clip_score"] for r in per if r["checkpoint"] == "base"]
    c = [r["clip_score"] for r in per if r["checkpoint"] != "base"]
    assert len(b) == len(c) == 14 and b != c
    assert all(isinstance(r["artifact_score"], float) for r in per)
    maps = [r for r in per if r["heatmap"]]
    assert len(maps) == 2 * 2 * 2 and all((res.run_dir / r["heatmap"]).is_file() for r in maps)
    (per_class,) = results["breakdowns"]["cluster_kl"].values()
    assert per_class and {"name", "n_od", "n_bm", "n_tm", "kl_od_tm"} <= set(per_class[0])
    kl_rows = df[df.metric == "cluster_kl"]
    assert kl_rows.value.notna().all() and (kl_rows.value >= 0).all()
    assert results["surfaces"] and results["surfaces"][0]["clip_score"].keys() == set(labels)
    assert results["surfaces"][0]["artifact_score"].keys() == set(labels)
    assert len(results["xray"]) == 2 and all(x["stats"] for x in results["xray"])

    html = res.report.read_text()
    check_report_html(html, report_html.SECTIONS)
    assert HOSTILE_DIR not in html  # the hostile data folder name appears only escaped
    assert "data &lt;b&gt;&amp;" in html
    assert html.count('alt="heatmap"') >= 2 and "No artifact scores in this run" not in html
    px = chromium_screenshot(res.report, tmp_path / "shot.png")
    assert px.std() > 5.0, "the report renders blank in Chromium"


@pytest.mark.slow
def test_resume_reuses_generations_and_gates_fail_as_configured(run, setup, capsys):
    out = run.run_dir
    pngs = sorted((out / layout.IMAGES).rglob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in pngs}
    rows = json.loads((out / layout.RESULTS).read_text())["rows"]
    # gates are not part of the suite's identity: same folder, generations reused, the gate now fails
    code = cli_main(_eval_args(setup, out, "--set", "gates.clip_score.min=1000", "--no-report"))
    err = capsys.readouterr()
    assert code == 1
    assert "gate(s) FAILED" in err.err and "clip_score" in err.err and "FAIL" in err.err
    assert "images generated: 0, reused: 28" in err.out
    assert {p: p.stat().st_mtime_ns for p in pngs} == before
    again = json.loads((out / layout.RESULTS).read_text())
    # same images, same cached features: same numbers (CLIP runs again, here with another thread count)
    assert [{k: v for k, v in r.items() if not isinstance(v, float)} for r in again["rows"]] == \
        [{k: v for k, v in r.items() if not isinstance(v, float)} for r in rows]
    def values(rs):
        return [float("nan") if r["value"] is None else r["value"] for r in rs]

    assert values(again["rows"]) == pytest.approx(values(rows), rel=1e-5, nan_ok=True)
    failed = [g for g in again["gates"] if not g["passed"]]
    assert {g["subset"] for g in failed} == {"generic", "in_domain"} and again["gates_passed"] is False
    # and passes again with the suite's own gates
    assert cli_main(_eval_args(setup, out, "--no-report")) == 0


def test_cluster_kl_with_the_detectors_own_features(run, setup, tmp_path, capsys):
    # A copy of the finished run: only scoring reruns, with crops embedded by the detector's neck features.
    import shutil

    out = tmp_path / "run-detector-features"
    shutil.copytree(run.run_dir, out)
    code = cli_main(_eval_args(setup, out, "--set", "metrics.cluster_kl.settings.embedder=detector", "--no-report"))
    assert code == 0, capsys.readouterr().err
    assert "images generated: 0" in capsys.readouterr().out
    clip_rows = [r for r in json.loads((run.run_dir / layout.RESULTS).read_text())["rows"] if r["metric"] == "cluster_kl"]
    det_rows = [r for r in json.loads((out / layout.RESULTS).read_text())["rows"] if r["metric"] == "cluster_kl"]
    assert len(det_rows) == len(clip_rows) and all(r["value"] is not None for r in det_rows)
    assert [r["value"] for r in det_rows] != pytest.approx([r["value"] for r in clip_rows])


@pytest.mark.slow
def test_two_processes_match_one(run, setup):
    """torchrun with 2 CPU processes (gloo on loopback): the same results.json as one process.
    (accelerate launch --cpu --num_processes 2 runs one process on a CPU-only machine.)"""
    out = setup["root"] / "run2p"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "harness", *_eval_args(setup, out, "--no-report")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both processes generated: each wrote its own generations file
    assert (out / "images" / "base" / "generations.jsonl").is_file()
    assert list((out / "images").rglob("generations.rank1.jsonl"))
    one = json.loads((run.run_dir / layout.RESULTS).read_text())
    two = json.loads((out / layout.RESULTS).read_text())
    assert strip_provenance(two) == strip_provenance(one)


def test_bad_checkpoint_fails_before_generating(setup, tmp_path):
    from harness.eval.runner import run_eval

    with pytest.raises(CheckpointError, match="not found"):
        run_eval(SUITE, base=str(setup["zoo"] / "sd"), candidates=[str(tmp_path / "nope")], out=tmp_path / "r",
                 data=setup["data"], overrides=_overrides(setup))
    assert not (tmp_path / "r").exists()


def test_run_dir_of_another_suite_version_is_refused(run, setup):
    from harness.eval.runner import run_eval

    with pytest.raises(HarnessError, match="made by suite 'tiny-cpu' version '1'.*use a new --out"):
        run_eval(SUITE, base=str(setup["zoo"] / "sd"), candidates=[str(setup["cand"])], out=run.run_dir,
                 data=setup["data"], overrides=[*_overrides(setup), "seeds=[5, 6]"])


def test_heldout_suite_needs_data(setup, tmp_path):
    from harness.eval.runner import run_eval

    with pytest.raises(HarnessError, match="held-out split.*--data"):
        run_eval(SUITE, base=str(setup["zoo"] / "sd"), candidates=[str(setup["cand"])], out=tmp_path / "r",
                 overrides=_overrides(setup))


@pytest.mark.slow
def test_report_and_compare_commands(run, setup, tmp_path, capsys):
    assert cli_main(["report", str(run.run_dir), "--out", str(tmp_path / "r.html")]) == 0
    check_report_html((tmp_path / "r.html").read_text(), report_html.SECTIONS)
    assert cli_main(["compare", str(run.run_dir), str(run.run_dir), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    assert "clip_score / generic" in text and "ft-checkpoint-100" in text
    html = (tmp_path / "cmp" / "compare.html").read_text()
    srcs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert len(srcs) >= 3 and all(u.startswith("data:image/png;base64,") for u in srcs)
    csv = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert set(csv.run) == {str(run.run_dir)} and len(csv) == 2 * len(run.results["rows"])
    with pytest.raises(HarnessError, match="not in these runs"):
        from harness.report.compare import compare_runs

        compare_runs([run.run_dir], metrics=["nope"])


@pytest.mark.slow
def test_metric_without_a_value_gives_a_gate_not_evaluated_not_fail(setup, tmp_path, capsys):
    """One in-domain image a side: KID is not computed ("needs at least 2 images"), so its gate is
    "not evaluated": exit 0 with a warning, exit 2 under --strict, never FAIL."""
    out = tmp_path / "one"
    small = ("--set", "seeds=[0]", "--set", "prompts.in_domain.limit=1", "--no-report")
    assert cli_main(_eval_args(setup, out, *small)) == 0
    res = json.loads((out / layout.RESULTS).read_text())
    kid = [g for g in res["gates"] if g["gate"] == "kid_clip"]
    assert kid and not any(g["evaluated"] for g in kid) and "at least 2" in kid[0]["reason"]
    assert "not evaluated" in capsys.readouterr().err
    assert cli_main(_eval_args(setup, out, *small, "--strict")) == 2
