"""SIGKILL at chosen points (see _killpoints.py), then resume: training ends with the weights of an
uninterrupted run; eval loses at most the batch in flight; torn cache and checkpoint writes are never
picked up; a corrupt latest checkpoint falls back to the previous one with a warning.

tests/test_train_resume.py already covers a kill *between* checkpoints and the fallback logic on
fabricated folders; here the kills land inside a latent-cache write, inside a checkpoint write and
inside an optimizer step of one run, and the corrupt checkpoint is a real one."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
from _rel_helpers import REPO, run_cli, run_killed

from harness.io import read_jsonl
from harness.train import checkpoint as ckpt

TINY = REPO / "recipes" / "tiny-cpu.yaml"
RNG = random.Random(10)  # kill points vary between the scenarios but are the same on every CI run


def _train_args(sd, data, out, cache) -> list[str]:
    from _train_helpers import overrides

    return ["train", str(TINY), *overrides(sd, data, out, cache, **{
        "train.max_steps": 14, "checkpoint.every_steps": 4, "validation.prompts": "[]",
        "validation.eval_metrics": "[]", "validation.every_steps": 0, "data.caption_dropout": 0.3})]


def _unet(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def _killed(proc) -> None:
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])


@pytest.mark.slow
def test_train_killed_in_cache_write_checkpoint_write_and_step_resumes_to_identical_weights(tiny_sd_dir, tmp_path):
    from _train_helpers import make_dataset

    from harness.cli import main

    data = make_dataset(tmp_path / "data", n_train=8, n_val=2)
    ref, run = tmp_path / "ref", tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): same float summation order
    try:
        assert main(_train_args(tiny_sd_dir, data, ref, tmp_path / "ref-cache")) == 0
    finally:
        torch.set_num_threads(threads)
    args = _train_args(tiny_sd_dir, data, run, tmp_path / "cache")

    # 1. killed half way through writing a latent-cache entry
    _killed(run_killed(args, f"latent-put:{RNG.randint(2, 7)}"))
    cache_files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert cache_files and list((tmp_path / "cache").rglob("*.tmp"))  # some entries, one torn temp file
    assert not ckpt.list_checkpoints(run) and not (run / "final").exists()

    # 2. resumed (nothing to resume: starts over, reusing the intact cache entries), killed inside the
    #    step-8 checkpoint write: its folder exists only under a temporary name
    _killed(run_killed([*args, "--resume", "latest"], "ckpt-write:8"))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000004"]
    assert list((run / "checkpoints").glob(".tmp-step-00000008-*"))
    assert ckpt.find_resume(run, "latest").name == "step-00000004"

    # 3. resumed from step 4, killed in the middle of an optimizer step after the step-8 checkpoint
    _killed(run_killed([*args, "--resume", "latest"], f"step:{RNG.randint(9, 11)}"))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000004", "step-00000008"]
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the start of run 3 cleaned the torn write

    # 4. the latest checkpoint is corrupt on disk (bit rot, a bad copy): resume falls back to step 4
    weights = run / "checkpoints" / "step-00000008" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    proc = run_cli([*args, "--resume", "latest"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-00000008 is incomplete or corrupt (model.safetensors does not match its checksum)" in proc.stderr

    a, b = _unet(ref), _unet(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 14
    steps = [m["step"] for m in read_jsonl(run / "metrics.jsonl") if "loss" in m]
    assert steps == list(range(1, 15))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000012", "step-00000014"]


SUITE = """name: kill
prompts:
  generic: {prompts: [a red apple, a photo of a cat, a blue car]}
seeds: [0, 1]
generation: {width: 32, height: 32, steps: 2, cfg: 3.0, batch_size: 2}
models: {clip: CLIP}
reference: {folder: ref}
metrics:
  clip_score: {}
  kid_clip: {metric: kid, settings: {subset_size: 3, subsets: 5, extractor: models.clip}}
xray: {samples: 0}
ci: {n_boot: 50}
"""


@pytest.fixture
def eval_setup(zoo_dir, tmp_path):
    import numpy as np
    from PIL import Image

    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.replace("CLIP", str(zoo_dir / "clip")))
    rng = np.random.default_rng(0)
    (tmp_path / "ref").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "ref" / f"{i}.png")
    cand = tmp_path / "ft" / "step-10"
    cand.parent.mkdir()
    cand.symlink_to(zoo_dir / "sd", target_is_directory=True)  # a second checkpoint label, same weights
    return suite, ["--base", str(zoo_dir / "sd"), "--candidate", str(cand)]


def _rows(run: Path) -> list:
    res = json.loads((run / "results.json").read_text())
    return sorted((r["checkpoint"], r["metric"], r["subset"], r["value"], r["ci_low"], r["ci_high"])
                  for r in res["rows"])


@pytest.mark.slow
def test_eval_killed_in_png_write_and_feature_cache_write_loses_only_the_batch_in_flight(eval_setup, tmp_path):
    from harness.report.evaluate import run_eval

    suite, ckpts = eval_setup
    run, ref = tmp_path / "run", tmp_path / "ref-run"
    base, cand = ckpts[1], ckpts[3]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clean = run_eval(suite, base=base, candidates=[cand], out=ref, report=False, progress=False)
        assert clean.generated == 12

        # killed half way through writing the 5th PNG: 4 images (two batches of 2) are finished
        _killed(run_killed(["eval", suite, *ckpts, "--out", run, "--no-report"], "png:5"))
        pngs = sorted(run.rglob("*.png"))
        assert len(pngs) == 4 and list(run.rglob(".*.png.*.tmp"))
        mtimes = {p: p.stat().st_mtime_ns for p in pngs}

        # resumed, then killed half way through writing the second feature cache file
        _killed(run_killed(["eval", suite, *ckpts, "--out", run, "--no-report"], "features:2"))
        caches = list((run / "cache").glob("*.npz"))
        assert len(caches) == 1  # the first is complete, the torn one exists only as a temp file
        assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # finished images not redone

        res = run_eval(suite, base=base, candidates=[cand], out=run, report=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert res.generated == 0 and res.skipped == 12  # the second run made the other 8
    assert _rows(run) == _rows(ref)  # same images, same features, same numbers as the uninterrupted run
    from harness.metrics.features import load_features

    for npz in (run / "cache").glob("*.npz"):
        load_features(npz)  # every cache file that exists is complete
