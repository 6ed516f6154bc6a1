"""A LoRA as the thing evaluated (issue 19): ``harness eval --candidate BASE::LORA@SCALE`` at two scales
on the tiny zoo, with a strength sweep in the report and the scale in ``harness compare``; a missing
LoRA fails before any image is generated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _report_helpers import check_report_html, make_dataset, untrained_estimator
from PIL import Image

from harness.cli import main
from harness.errors import CheckpointError
from harness.eval import layout
from harness.report import html as report_html

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "eval" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def setup(zoo_dir, tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from harness.train.pipeline import save_lora

    root = tmp_path_factory.mktemp("lora-eval")
    pipe = StableDiffusionPipeline.from_pretrained(zoo_dir / "sd")
    torch.manual_seed(0)
    # init_lora_weights=False draws B at random too, so the adapter changes images from the start
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = save_lora(pipe.unet, None, root / "style" / "lora", kohya_file="style.safetensors")
    return {"root": root, "zoo": zoo_dir, "lora": lora, "data": make_dataset(root / "data"),
            "estimator": untrained_estimator(zoo_dir, root / "estimator")}


def _args(s, out: Path, candidates: list[str]) -> list[str]:
    zoo = s["zoo"]
    args = ["eval", str(SUITE), "--base", str(zoo / "sd"), "--data", str(s["data"]), "--out", str(out)]
    for c in candidates:
        args += ["--candidate", c]
    for o in (f"models.clip={zoo / 'clip'}", f"models.detector={zoo / 'yolo'}", f"models.estimator={s['estimator']}",
              "seeds=[0]", "prompts.in_domain.limit=3", "xray.samples=0", "metrics.cluster_kl.settings.conf=0.0",
              "metrics.cluster_kl.settings.imgsz=64"):
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def sweep_run(setup):
    out = setup["root"] / "run"
    spec = f"{setup['zoo'] / 'sd'}::{setup['lora']}"
    code = main(_args(setup, out, [f"{spec}@0.5", f"{spec}@1"]))
    return code, out


def _pixels(run: Path, label: str) -> np.ndarray:
    files = sorted((run / layout.IMAGES / label).rglob("*.png"))
    assert files, label
    return np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in files])


@pytest.mark.slow
def test_eval_of_a_lora_at_two_scales_has_a_strength_sweep(sweep_run, setup):
    code, run = sweep_run
    assert code == 0
    res = json.loads((run / layout.RESULTS).read_text())
    cands = [c for c in res["checkpoints"] if c["role"] == "candidate"]
    assert [(c["label"], c["lora_scale"]) for c in cands] == [("style@0.5", 0.5), ("style@1", 1.0)]
    assert all(c["lora"] == str(setup["lora"]) and c["lora_base"] == str(setup["zoo"] / "sd") for c in cands)
    assert len({c["sha256"] for c in res["checkpoints"]}) == 3  # the scale is part of what is hashed
    base, half, full = (_pixels(run, lab) for lab in ("base", "style@0.5", "style@1"))
    assert np.abs(half - base).mean() > 1 and np.abs(full - half).mean() > 1  # each scale is its own model

    html = (run / layout.REPORT).read_text()
    check_report_html(html, [*report_html.SECTIONS, ("sweep", "Strength sweep")])
    sweep = html[html.index('<section id="sweep">'):html.index('<section id="gates">')]
    assert "scale 0</th>" in sweep and "scale 0.5</th>" in sweep and "scale 1</th>" in sweep
    assert "clip_score" in sweep and sweep.count("data:image/png;base64,") >= 1


@pytest.mark.slow
def test_compare_places_lora_candidates_at_their_scale(sweep_run, tmp_path, capsys):
    _, run = sweep_run
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    assert "lora_scale" in capsys.readouterr().out
    csv = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert sorted(csv[csv.role == "candidate"].lora_scale.unique()) == [0.5, 1.0]


def test_a_missing_lora_fails_before_generating(setup, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(_args(setup, out, [f"{setup['zoo'] / 'sd'}::{tmp_path / 'nope'}@1"])) != 0
    err = capsys.readouterr().err
    assert "nope: LoRA weights not found" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(CheckpointError, match="a diffusers model folder, not LoRA weights"):
        from harness.eval.plan import checkpoints

        checkpoints(str(setup["zoo"] / "sd"), [f"{setup['zoo'] / 'sd'}::{setup['zoo'] / 'sd'}@1"])


def test_the_same_syntax_in_generate_and_grid(setup, tmp_path):
    spec = f"{setup['zoo'] / 'sd'}::{setup['lora'] / 'style.safetensors'}"
    common = ["--prompt", "a red apple", "--steps", "2", "--width", "64", "--height", "64", "--device", "cpu"]
    assert main(["generate", "--model", f"{spec}@0", "--model", f"{spec}@1", "--out", str(tmp_path / "g"),
                 *common]) == 0
    assert main(["grid", "--model", spec, "--x", "lora_scale=0,1", "--out", str(tmp_path / "grid"), *common]) == 0
    grid = json.loads((tmp_path / "grid" / "grid.json").read_text())
    assert [c["params"]["lora_scale"] for c in grid["cells"]] == [0.0, 1.0]
    made = {}
    for rec in map(json.loads, (tmp_path / "g" / "generations.jsonl").read_text().splitlines()):
        made[rec["checkpoint"].rsplit("@", 1)[1]] = np.asarray(Image.open(tmp_path / "g" / rec["file"]), dtype=np.int16)
    cells = {c["params"]["lora_scale"]: c["images"][0]["file"] for c in grid["cells"]}
    for scale, key in ((0.0, "0"), (1.0, "1")):  # the grid's scale axis and the spec's scale agree
        assert np.array_equal(made[key], np.asarray(Image.open(tmp_path / "grid" / cells[scale]), dtype=np.int16))
    assert np.abs(made["1"] - made["0"]).mean() > 1


def _row(label, role, value, verdict=None, metric="clip_score", hib=True):
    return {"checkpoint": label, "role": role, "metric": metric, "subset": "generic", "value": value,
            "ci_low": value - 1, "ci_high": value + 1, "diff": None if role == "base" else value - 10,
            "diff_ci_low": None, "diff_ci_high": None, "verdict": verdict, "note": None, "higher_is_better": hib}


def test_strength_sweep_groups_one_lora_across_scales():
    from harness.report.sweep import strength_sweeps

    ckpts = [{"label": "base", "role": "base", "source": "B"},
             {"label": "s@1", "role": "candidate", "source": "B::s@1", "lora": "s", "lora_scale": 1.0, "lora_base": "B"},
             {"label": "s@0.5", "role": "candidate", "source": "B::s@0.5", "lora": "s", "lora_scale": 0.5,
              "lora_base": "B"},
             {"label": "t@1", "role": "candidate", "source": "B::t@1", "lora": "t", "lora_scale": 1.0, "lora_base": "B"},
             {"label": "ft", "role": "candidate", "source": "ft"}]
    rows = [_row("base", "base", 10), _row("s@0.5", "candidate", 14, "better"), _row("s@1", "candidate", 12),
            _row("t@1", "candidate", 30), _row("ft", "candidate", 40),
            _row("base", "base", 5, metric="fid", hib=False), _row("s@0.5", "candidate", 7, metric="fid", hib=False),
            _row("s@1", "candidate", 6, metric="fid", hib=False)]
    (sw,) = strength_sweeps({"checkpoints": ckpts, "rows": rows})  # t has one scale, ft is no LoRA: no sweep
    assert sw["lora"] == "s" and sw["scales"] == [0.0, 0.5, 1.0] and sw["labels"] == ["base", "s@0.5", "s@1"]
    clip, fid = sw["table"]
    assert [c["value"] for c in clip["cells"]] == [10, 14, 12] and clip["best"] == 0.5 and fid["best"] == 0.0
    assert len(sw["figures"]) == 2 and all(uri.startswith("data:image/png;base64,") for _, uri in sw["figures"])
    other_base = [dict(c, lora_base="C") if c.get("lora") else c for c in ckpts]
    (sw2,) = strength_sweeps({"checkpoints": other_base, "rows": rows})
    assert sw2["scales"] == [0.5, 1.0]  # the eval's base is not this LoRA's base: no scale 0
    assert strength_sweeps({"checkpoints": ckpts[:2] + ckpts[3:], "rows": rows}) == []
