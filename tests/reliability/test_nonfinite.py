"""NaN/Inf. Training: tests/test_train_loop.py::test_nan_loss_stops_and_keeps_last_good_checkpoint
(a NaN loss stops the run before the update, keeps the last good checkpoint, and resume works).
Here: a NaN loss through the CLI is one line and exit 2; a prompt whose sample goes NaN in eval is
marked (PNG metadata, per-image table, report) and left out of every metric while the run goes on."""

from __future__ import annotations

import json

import pytest
import torch
from _rel_helpers import REPO

from harness.cli import main
from harness.eval import layout
from harness.train import checkpoint as ckpt

SUITE = """name: nan
prompts:
  generic: {prompts: [a red apple, POISON a photo of a cat, a blue car]}
seeds: [0, 1]
generation: {width: 32, height: 32, steps: 2, cfg: 3.0, batch_size: 3}
models: {clip: CLIP}
metrics:
  clip_score: {}
xray: {samples: 0}
ci: {n_boot: 50}
"""


@pytest.fixture
def poisoned(monkeypatch):
    """Text embeddings of prompts containing POISON become NaN: that sample's latents go NaN in the
    UNet, the other samples of the same batch must not."""
    from harness.generate import sample

    real = sample.encode_texts

    def encode(pipe, texts, **kw):
        out = real(pipe, texts, **kw).clone()
        for i, t in enumerate(texts):
            if "POISON" in t:
                out[i] = float("nan")
        return out

    monkeypatch.setattr(sample, "encode_texts", encode)


def test_eval_marks_nan_samples_and_scores_the_rest(zoo_dir, tmp_path, poisoned):
    from harness.generate.batch import read_png_params
    from harness.report.evaluate import run_eval

    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.replace("CLIP", str(zoo_dir / "clip")))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_eval(suite, base=str(zoo_dir / "sd"), candidates=[str(zoo_dir / "sd")], out=tmp_path / "run",
                       progress=False)
    finally:
        torch.set_num_threads(n)
    assert res.generated == 12  # every image was made; the run did not stop at the bad ones
    per = [json.loads(x) for x in (res.run_dir / layout.PER_IMAGE).read_text().splitlines()]
    bad = [r for r in per if r["nonfinite"]]
    assert sorted((r["checkpoint"], r["seed"]) for r in bad) == [("base", 0), ("base", 1), ("sd", 0), ("sd", 1)]
    assert all("POISON" in r["prompt"] for r in bad)
    for r in per:
        meta = read_png_params(res.run_dir / r["image"])
        assert meta["finite"] is (not r["nonfinite"])
        assert (r["clip_score"] is None) == r["nonfinite"]  # left out of the metric, not scored as 0 or NaN
    results = json.loads((res.run_dir / layout.RESULTS).read_text())
    assert results["counts"]["nonfinite"] == 4
    assert any("NaN/Inf" in note for note in results["notes"])
    rows = [r for r in results["rows"] if r["metric"] == "clip_score"]
    assert rows and all(r["n"] == 4 and r["value"] is not None for r in rows)  # 6 images - 2 marked
    html = res.report.read_text()
    assert html.count("thumb nonfinite") == 4 and "NaN/Inf" in html


@pytest.mark.slow
def test_nan_training_loss_via_cli_is_one_line_and_keeps_last_checkpoint(tiny_sd_dir, tmp_path, capsys,
                                                                        monkeypatch):
    from _train_helpers import make_dataset, overrides

    import harness.train.loop as loop

    real, calls = loop.diffusion_loss, []

    def diverging(*a, **kw):
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float("inf") if len(calls) >= 4 else loss

    monkeypatch.setattr(loop, "diffusion_loss", diverging)
    data = make_dataset(tmp_path / "data", n_train=4, n_val=1)
    run = tmp_path / "run"
    argv = ["train", str(REPO / "recipes" / "tiny-cpu.yaml"), *overrides(
        tiny_sd_dir, data, run, tmp_path / "cache", **{"train.max_steps": 6, "checkpoint.every_steps": 2,
                                                         "validation.prompts": "[]", "validation.eval_metrics": "[]",
                                                         "validation.every_steps": 0, "train.batch_size": 2})]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(argv)
    finally:
        torch.set_num_threads(n)
    err = capsys.readouterr().err
    # the error line may follow a progress bar's carriage return on the same terminal line
    lines = [ln[ln.index("harness train: error: "):] for ln in err.splitlines() if "harness train: error: " in ln]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "step 4: training loss is" in lines[0] and "step-00000002" in lines[0]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002"]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step-00000002") is None
    assert not (run / "final").exists()
