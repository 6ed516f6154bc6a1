"""`harness demo` end to end on the smallest digits world (every part trained 10 steps).

The numbers of such a world mean nothing; this checks the plumbing of the README's main job: world ->
restyled data -> BLIP captions with the suffix -> fine-tune through harness.train -> eval -> report and
summary. Whether the numbers point the right way on a trained world is tests/test_demo.py's job.
"""

from __future__ import annotations

import json
import logging
from html.parser import HTMLParser

import pytest

from harness.world import digits as D

pytestmark = pytest.mark.slow


PROGRESS_LINES: list[str] = []


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from harness.world.demo import run_demo

    cfg = D.WorldConfig().scaled(0.0)  # every part at its 10-step minimum
    root = tmp_path_factory.mktemp("demo-smoke")
    # every progress update logs (the default is every 30 s): which phases report when no bar is drawn
    mp = pytest.MonkeyPatch()
    mp.setenv("HARNESS_PROGRESS_SECONDS", "0")
    handler = logging.Handler()
    handler.emit = lambda record: PROGRESS_LINES.append(record.getMessage())
    logger = logging.getLogger("harness.progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        world = D.build_world(root / "world", cfg)
    finally:
        logger.removeHandler(handler)
        mp.undo()
    return run_demo(root / "demo", cfg=cfg, world_dir=world, progress=False,
                    recipe_overrides=["train.max_steps=4", "train.batch_size=8", "checkpoint.every_steps=2"],
                    eval_overrides=["prompts.in_domain.limit=8", "ci.n_boot=20", "generation.steps=4",
                                    "grids=[{name: g, prompt: 'a handwritten digit one in red ink', "
                                    "x: 'cfg=1,4', y: 'steps=2,4'}]"])


def test_demo_writes_world_captions_finetune_and_report(demo):
    for part in ("sd", "clip", "blip", "yolo"):
        assert (demo.world / part).is_dir(), part
    # on two or more cores the judges train in a second process beside the UNet; their times are merged
    world = json.loads((demo.world / "world.json").read_text())
    assert set(world["parts"]) == set(D.PARTS) and not (demo.world / D.SIDE_META).exists()
    expect = "second" if D.os.cpu_count() >= 2 else None
    assert all(world["parts"][p].get("process") == expect for p in D.SIDE_PARTS), world["parts"]
    captions = sorted((demo.out / "data").rglob("*.txt"))
    # the suffix, unless the caption already says "red ink" (then it is not said twice)
    assert len(captions) > 100 and all(c.read_text().endswith(", red ink") or c.read_text().count("red ink") == 1
                                       for c in captions)
    assert (demo.finetune / "model_index.json").is_file()
    summary = json.loads((demo.out / "finetune" / "train_summary.json").read_text())
    assert summary["steps"] == 4
    assert demo.report.is_file() and demo.report.name == "report.html"
    HTMLParser().feed(demo.report.read_text())  # parses
    saved = json.loads((demo.out / "demo.json").read_text())
    assert saved["summary"] == demo.summary and demo.summary.strip()
    assert saved["shift"] == demo.shift and set(demo.shift) >= {"kl_base_finetune", "kl_base_base"}


def test_demo_results_compare_base_and_finetune(demo):
    rows = demo.results["rows"]
    metrics = {r["metric"] for r in rows}
    assert {"clip_score", "fid_clip", "kid_clip", "cmmd"} <= metrics
    roles = {(r["metric"], r["role"]) for r in rows}
    assert ("fid_clip", "base") in roles and ("fid_clip", "candidate") in roles
    cand = [r for r in rows if r["role"] == "candidate" and r["value"] is not None]
    assert cand and all(r["verdict"] in ("better", "worse", "inconclusive") for r in cand if "verdict" in r)


def test_world_build_reports_progress_in_log_files(demo):
    """Without a terminal the world's training loops log step/total and an ETA (every 30 s by default)."""
    for phase in ("digits world: vae: ", "digits world: unet+text: ", "train estimator: "):
        assert any(line.startswith(phase) and "elapsed" in line for line in PROGRESS_LINES), phase
    assert any("ETA" in line for line in PROGRESS_LINES)
