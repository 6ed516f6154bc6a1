"""Kill and resume: a SIGKILLed run resumed with --resume latest ends with the weights of an
uninterrupted run; half-written and corrupt checkpoints are never picked."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _train_helpers import REPO, launch_env, make_dataset, overrides

from harness.errors import CheckpointError
from harness.io import read_jsonl
from harness.train import checkpoint as ckpt
from harness.train.loop import train_from_file

TINY = REPO / "recipes" / "tiny-cpu.yaml"


def _args(tiny_sd_dir, data, out, cache):
    return [str(TINY), *overrides(tiny_sd_dir, data, out, cache, **{
        "train.max_steps": 14, "checkpoint.every_steps": 4, "validation.prompts": "[]",
        "validation.eval_metrics": "[]", "validation.every_steps": 0, "data.caption_dropout": 0.3})]


def _start(args, extra=()):
    return subprocess.Popen([sys.executable, "-m", "harness.train", *args, *extra], env=launch_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _unet(run):
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tiny_sd_dir, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=8, n_val=2)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): same float summation order
    try:
        train_from_file(TINY, _args(tiny_sd_dir, data, ref, tmp_path / "cache")[1:])
    finally:
        torch.set_num_threads(threads)
    p = _start(_args(tiny_sd_dir, data, killed, tmp_path / "cache"))
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step-00000008").exists():
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)  # mid-run: between the step-8 checkpoint and the end
    p.wait()
    assert not (killed / "final").exists()
    resumed = _start(_args(tiny_sd_dir, data, killed, tmp_path / "cache"), ["--resume", "latest"])
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    a, b = _unet(ref), _unet(killed)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit-identical
    steps = [m["step"] for m in read_jsonl(killed / "metrics.jsonl") if "loss" in m]
    assert steps == list(range(1, 15))  # records past the checkpoint were redone once, not duplicated
    assert json.loads((killed / "train_summary.json").read_text())["steps"] == 14
    assert [p.name for p in ckpt.list_checkpoints(killed)] == ["step-00000012", "step-00000014"]  # keep_last: 2


def _fake_checkpoint(run, step, corrupt=False):
    d = run / "checkpoints" / ckpt.checkpoint_name(step)
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"weights")
    (d / ckpt.STATE).write_text(json.dumps({"step": step}))
    ckpt.write_manifest(d)
    if corrupt:
        (d / "model.safetensors").write_bytes(b"weightz")
    return d


def test_resume_latest_skips_corrupt_and_unfinished(tmp_path, caplog):
    run = tmp_path / "run"
    assert ckpt.find_resume(run, "latest") is None  # nothing yet: start from the beginning
    good = _fake_checkpoint(run, 4)
    _fake_checkpoint(run, 8, corrupt=True)
    unfinished = run / "checkpoints" / ".tmp-step-00000012-abcd"  # a kill during a checkpoint write
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"half")
    no_manifest = run / "checkpoints" / "step-00000010"
    no_manifest.mkdir()
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_resume(run, "latest") == good
    assert "step-00000010 is incomplete or corrupt (no readable manifest.json" in caplog.text
    assert "step-00000008 is incomplete or corrupt (model.safetensors does not match its checksum)" in caplog.text
    ckpt.clean_stale(run)
    assert not unfinished.exists()
    with pytest.raises(CheckpointError, match="checkpoint is incomplete or corrupt: model.safetensors"):
        ckpt.find_resume(run, str(run / "checkpoints" / "step-00000008"))
    (good / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from \\(3 found, all corrupt\\)"):
        ckpt.find_resume(run, "latest")
