"""fp16 training with loss scaling, run on the CPU through accelerate's own fp16 path (see
``_train_helpers.fp16_on_cpu``: torch's CPU autocast and GradScaler stand in for CUDA's).

What a GPU user of fp16 depends on and these check: the trained weights stay fp32 (a GradScaler refuses
to unscale fp16 gradients, so LoRA weights on an fp16 base must be fp32), an overflowed step is skipped
without moving the LR schedule or EMA, a run that only overflows stops with a clear message, the loss
scale is logged and restored on resume, and the export is fp32."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _train_helpers import fp16_on_cpu, make_dataset, quick_recipe

from harness.io import read_jsonl
from harness.train import optim
from harness.train.loop import train
from harness.train.optim import TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=4, n_val=2, size=32)


def _unet(final):
    from safetensors.torch import load_file

    return load_file(str(final / "unet" / "diffusion_pytorch_model.safetensors"))


def _records(run):
    return [m for m in read_jsonl(run / "metrics.jsonl") if "loss" in m]


@pytest.mark.parametrize("kind", ["full", "lora", "lora+text"])
def test_fp16_trains_with_loss_scaling_and_exports_fp32(tiny_sd_dir, data_dir, tmp_path, monkeypatch, kind):
    from diffusers import StableDiffusionPipeline

    fp16_on_cpu(monkeypatch)
    extra = {
        # fixed-seed samples under fp16 autocast (an fp32 UNet with the fp16 VAE and text encoder)
        "full": {"validation.prompts": "['a cat']", "validation.every_steps": 3},
        # the scaler unscales once per optimizer step, after both micro-batches
        "lora": {"lora.enabled": True, "train.batch_size": 2, "train.grad_accum": 2},
        "lora+text": {"lora.enabled": True, "lora.text_encoder": True, "data.cache_text": False},
    }[kind]
    r = quick_recipe(tiny_sd_dir, data_dir, tmp_path, **{"train.mixed_precision": "fp16", "train.cpu": True,
                                                         "train.max_steps": 3, "lora.rank": 4, **extra})
    final = train(r)
    logged = _records(tmp_path / "run")
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in logged)
    # the scaler ran: the default initial scale, no overflow on these steps
    assert [m["loss_scale"] for m in logged] == [65536.0] * 3
    assert [m["skipped_steps"] for m in logged] == [0, 0, 0]
    pipe = StableDiffusionPipeline.from_pretrained(final)
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.float32}
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    changed = [not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), base.unet.parameters())]
    assert any(changed), "fp16 steps left the UNet as it was"
    if kind == "full":
        assert len(list((tmp_path / "run" / "samples" / "step-00000003").glob("*.png"))) == 1
    if kind == "lora+text":
        assert any(not torch.equal(a, b) for a, b in zip(pipe.text_encoder.parameters(),
                                                          base.text_encoder.parameters()))


def test_overflowed_steps_are_skipped_without_moving_the_schedule(tiny_sd_dir, data_dir, tmp_path, monkeypatch):
    # a scale so large that the fp16 gradients overflow, and a back-off big enough to leave it in a few steps
    fp16_on_cpu(monkeypatch, init_scale=2.0**60, backoff_factor=2.0**-20)
    r = quick_recipe(tiny_sd_dir, data_dir, tmp_path, **{"train.mixed_precision": "fp16", "train.cpu": True,
                                                         "train.max_steps": 6, "train.warmup_steps": 6,
                                                         "ema.enabled": True, "ema.update_after_step": 0})
    train(r)
    logged = _records(tmp_path / "run")
    skipped = [m["skipped_steps"] for m in logged]
    scales = [m["loss_scale"] for m in logged]
    n = skipped[-1]
    assert 1 <= n < 6, skipped  # some steps overflowed and some were applied
    assert skipped == [min(i + 1, n) for i in range(6)]  # the overflows come first, while the scale is too big
    assert scales[:n] == [2.0 ** (60 - 20 * (i + 1)) for i in range(n)]
    # linear warm-up: the LR of each step after a skipped one is the same (the schedule did not move)
    lrs = [m["lr"] for m in logged]
    assert lrs[: n + 1] == [lrs[0]] * (n + 1)
    assert lrs[n + 1] > lrs[n]
    state = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert state["steps"] == 6


def test_a_run_that_only_overflows_stops_and_keeps_its_checkpoints(tiny_sd_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(optim, "MAX_SKIPPED_IN_ROW", 3)
    fp16_on_cpu(monkeypatch, init_scale=2.0**60)  # halving from 2**60: dozens of overflows in a row
    r = quick_recipe(tiny_sd_dir, data_dir, tmp_path, **{"train.mixed_precision": "fp16", "train.cpu": True,
                                                         "train.max_steps": 8, "checkpoint.every_steps": 2})
    with pytest.raises(TrainingDiverged, match=r"step 3: the last 3 optimizer steps were all skipped because the "
                                               r"fp16 gradients overflowed \(loss scale now 1\.44115e\+17\); the "
                                               r"weights are those of step 0; .*step-00000002.*lower train\.lr"):
        train(r)
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (run / "final").exists()


def test_fp16_resume_restores_the_loss_scale_exactly(tiny_sd_dir, data_dir, tmp_path, monkeypatch):
    # the scale doubles after every applied step (the logged scale is the one the next step uses), so a
    # resume that lost the scaler would log another one
    fp16_on_cpu(monkeypatch, init_scale=2.0**4, growth_interval=1)
    extra = {"train.mixed_precision": "fp16", "train.cpu": True, "train.max_steps": 4, "checkpoint.every_steps": 2}
    first = quick_recipe(tiny_sd_dir, data_dir, tmp_path / "a", **extra)
    train(first)
    ref = tmp_path / "a" / "run"
    assert [m["loss_scale"] for m in _records(ref)] == [32.0, 64.0, 128.0, 256.0]
    assert (ref / "checkpoints" / "step-00000002" / "scaler.pt").is_file()

    again = tmp_path / "b" / "run"
    shutil.copytree(ref, again)
    for p in ("final", "final.safetensors", "train_summary.json", "checkpoints/step-00000004"):
        shutil.rmtree(again / p) if (again / p).is_dir() else (again / p).unlink()
    resumed = quick_recipe(tiny_sd_dir, data_dir, tmp_path / "b", **extra)
    final = train(resumed, resume="latest")
    assert [m["loss_scale"] for m in _records(again)] == [32.0, 64.0, 128.0, 256.0]
    a, b = _unet(ref / "final"), _unet(final)
    assert all(torch.equal(a[k], b[k]) for k in a)
