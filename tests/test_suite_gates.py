"""Every gate of every shipped suite can fail: its metric, computed on the tiny zoo's models, crosses the
gate's threshold on a planted change (the candidate's images collapse to black), and, for the metrics
that carry a signal in the tiny zoo, stays inside it when the candidate draws from the base's distribution.

A gate set on the wrong scale (``fid_clip: {max_increase: 2.0}`` on unit-vector features, whose FID is
bounded near 4 and moved by 0.1 here) could never fail; this is the test that says so. Metrics whose
default models are not offline (CLIP ViT-B/32, ViT-L/14@336) run on the zoo's CLIP with their own
preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.eval import gates, plan
from harness.eval.suite import load_suite, metric_class

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("quick", "full", "tiny-cpu", "demo-digits")
N = 40  # images a side: more than the zoo CLIP's 32 feature dimensions, so FID is full-rank
# In the tiny zoo these judges carry no signal to pass on (random detector: two draws of one distribution
# are ~1.6 nats apart at this N; untrained estimator: every image rates ~2.56), so only failing is checked.
NO_SIGNAL = ("cluster_kl", "artifact_score")


def _gates():
    out = []
    for name in SHIPPED:
        suite = load_suite(ROOT / "eval" / f"{name}.yaml")
        out += [(name, label) for label in suite.gates]
    return out


def _squares(n: int, seed: int) -> list[Image.Image]:
    """The tiny suites' data: a coloured square on a coloured ground (tests/_report_helpers.make_dataset)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = np.zeros((64, 64, 3), np.uint8)
        a[...] = rng.integers(0, 255, 3)
        a[16:48, 16:48] = rng.integers(0, 255, 3)
        out.append(Image.fromarray(a))
    return out


SETS = {"ref": _squares(N, 0), "base": _squares(N, 1), "same": _squares(N, 2),
        "planted": [Image.new("RGB", (64, 64))] * N}
PROMPTS = [f"a square of colour {i % 5}" for i in range(N)]  # the tiny data's captions


def _set_value(cls, settings: dict, clip: str, images) -> float:
    m = cls(clip, **{k: v for k, v in settings.items() if k not in ("extractor", "n_boot")})
    m.update(SETS["ref"], real=True)
    m.update(images, real=False)
    v = m.compute()
    return float(v[0] if isinstance(v, tuple) else v)


@pytest.fixture(scope="module")
def judges(zoo_dir, tmp_path_factory):
    from _report_helpers import untrained_estimator

    from harness.metrics.clip_score import CLIPScore
    from harness.metrics.detector import YoloDetector

    return {"clip": f"clip:{zoo_dir / 'clip'}", "clip_score": CLIPScore(f"clip:{zoo_dir / 'clip'}"),
            "detector": YoloDetector(str(zoo_dir / "yolo"), conf=0.0, imgsz=64),
            "estimator": untrained_estimator(zoo_dir, tmp_path_factory.mktemp("est") / "est")}


def _value(kind: str, cls, settings: dict, judges: dict, images) -> float:
    if kind == "set":
        return _set_value(cls, settings, judges["clip"], images)
    if kind == "clip":
        m = judges["clip_score"]
        m.reset()
        m.update(images, PROMPTS)
        return float(np.mean(m.scores()))
    if kind == "artifact":
        m = cls(judges["estimator"])
        m.update(torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]))
        return float(m.compute())
    m = cls(judges["detector"], judges["clip"], conf=0.0, seed=0)
    m.update(SETS["ref"], set="od")
    m.update(images, set="tm")
    return float(m.compute()["value"])


@pytest.mark.parametrize("suite_name,label", _gates())
def test_every_shipped_gate_fails_on_a_planted_change(suite_name, label, judges):
    from harness.eval.scoring import kind_of

    suite = load_suite(ROOT / "eval" / f"{suite_name}.yaml")
    name = suite.metric_name(label)
    cls = metric_class(name)
    kind = kind_of(name, cls)
    gate = suite.gates[label]
    subset = gate.subset or suite.subsets_of(label)[0]
    values = {s: _value(kind, cls, dict(suite.metrics[label].settings), judges, SETS[s])
              for s in ("base", "same", "planted")}
    ckpts = [plan.Checkpoint("base", "base", "b"), plan.Checkpoint("same", "candidate", "s"),
             plan.Checkpoint("planted", "candidate", "p")]
    rows = [{"metric": label, "checkpoint": c.label, "role": c.role, "subset": subset, "value": values[c.label],
             "note": None} for c in ckpts]
    results, _ = gates.evaluate(suite, rows, ckpts)
    by = {c: [g for g in results if g.checkpoint == c and g.subset == subset] for c in ("same", "planted")}
    assert by["planted"] and all(g.evaluated for g in by["planted"])
    assert not all(g.passed for g in by["planted"]), (suite_name, label, values)
    if name not in NO_SIGNAL:
        assert all(g.passed for g in by["same"]), (suite_name, label, values)
