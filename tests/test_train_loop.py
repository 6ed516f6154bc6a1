"""The training loop in-process on the tiny zoo: learning, caching, LoRA export, bad input, NaN, stages."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from _train_helpers import make_dataset
from _train_helpers import quick_recipe as recipe

from harness.errors import CheckpointError, ConfigError, HarnessError
from harness.io import read_jsonl
from harness.train.loop import train
from harness.train.optim import TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=8, n_val=2, size=32)


def unet_state(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_training_reduces_validation_loss(tiny_sd_dir, data_dir, tmp_path):
    r = recipe(tiny_sd_dir, data_dir, tmp_path, **{"train.max_steps": 30, "validation.every_steps": 30,
                                                   "train.lr": 2e-3})
    final = train(r)
    val = [m for m in read_jsonl(final.parent / "metrics.jsonl") if "val_loss" in m]
    assert [m["step"] for m in val] == [0, 30]
    assert val[-1]["val_loss"] < 0.8 * val[0]["val_loss"]
    logged = [m for m in read_jsonl(final.parent / "metrics.jsonl") if "loss" in m]
    assert len(logged) == 30 and all(m["images_per_s"] > 0 and m["cpu_peak_mib"] > 0 for m in logged)
    assert (final / "model_index.json").is_file() and final.with_suffix(".safetensors").is_file()
    summary = json.loads((final.parent / "train_summary.json").read_text())
    assert summary["steps"] == 30 and summary["stopped"] == "completed" and summary["best_step"] == 30


def test_cached_and_uncached_runs_match(tiny_sd_dir, data_dir, tmp_path):
    cached = train(recipe(tiny_sd_dir, data_dir, tmp_path / "a", **{"train.max_steps": 3}))
    plain = train(recipe(tiny_sd_dir, data_dir, tmp_path / "b", **{"train.max_steps": 3, "data.cache_latents": False,
                                                                   "data.cache_text": False}))
    a, b = unet_state(cached.parent), unet_state(plain.parent)
    assert any(not torch.equal(a[k], v) for k, v in unet_state_base(tiny_sd_dir).items())  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def unet_state_base(tiny_sd_dir):
    from safetensors.torch import load_file

    return load_file(str(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def test_latent_cache_hit_miss_invalidation(tiny_sd_dir, tmp_path):
    from diffusers import AutoencoderKL
    from PIL import Image

    from harness.data.folder import scan_dataset
    from harness.data.loader import ImageCaptionDataset
    from harness.train.cache import LatentCache

    data = make_dataset(tmp_path / "d", n_train=3, n_val=0, size=32)
    vae = AutoencoderKL.from_pretrained(tiny_sd_dir / "vae")

    def fill(resolution=32, model=vae):
        ds = ImageCaptionDataset(scan_dataset(data, split="train"), resolution=resolution)
        cache = LatentCache(tmp_path / "cache", model)
        keys = cache.fill(ds, list(range(len(ds))))
        return cache.store.hits, cache.store.misses, keys

    assert fill()[:2] == (0, 3)
    hits, misses, keys = fill()
    assert (hits, misses) == (3, 0)
    img = data / "train" / "img001.png"
    Image.open(img).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(img)  # same name, new content
    assert fill()[:2] == (2, 1)
    assert fill(resolution=24)[:2] == (0, 3)  # another size: other crops, other latents
    other = AutoencoderKL.from_pretrained(tiny_sd_dir / "vae")
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(0.01)
    assert fill(model=other)[:2] == (0, 3)  # another VAE
    # a corrupt entry is a miss, re-encoded, not a crash
    cache = LatentCache(tmp_path / "cache", vae)
    cache.store.path(keys[0]).write_bytes(b"not safetensors")
    assert fill()[:2] == (2, 1)


def test_lora_run_writes_weights_plain_diffusers_loads(tiny_sd_dir, data_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    r = recipe(tiny_sd_dir, data_dir, tmp_path, **{"lora.enabled": True, "lora.rank": 4, "train.lr": 0.05,
                                                   "train.max_steps": 3, "checkpoint.single_file": False})
    final = train(r)
    lora = final.parent / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.is_file()

    def sample(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a cat", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    before = sample(base)
    base.load_lora_weights(str(lora.parent))
    with_lora = sample(base)
    assert not torch.allclose(torch.from_numpy(before), torch.from_numpy(with_lora))
    fused = StableDiffusionPipeline.from_pretrained(final)  # final/ = the LoRA fused into the base
    torch.testing.assert_close(torch.from_numpy(sample(fused)), torch.from_numpy(with_lora), atol=2e-3, rtol=0)


def test_bad_input_fails_before_training(tiny_sd_dir, data_dir, tmp_path, monkeypatch):
    with pytest.raises(HarnessError, match="data.root = .*missing: no such folder"):
        train(recipe(tiny_sd_dir, tmp_path / "missing", tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarnessError, match="no usable training images"):
        train(recipe(tiny_sd_dir, tmp_path / "empty", tmp_path))
    bare = make_dataset(tmp_path / "bare", n_train=2, n_val=0, captions=False)
    with pytest.raises(HarnessError, match="none of the 2 training images has a caption"):
        train(recipe(tiny_sd_dir, bare, tmp_path))
    with pytest.raises(HarnessError, match="train.batch_size = 16: one step needs 16 images .* has 8"):
        train(recipe(tiny_sd_dir, data_dir, tmp_path, **{"train.batch_size": 16}))
    with pytest.raises(ConfigError, match="'data.resolution' = 36: expected a multiple of 8"):
        recipe(tiny_sd_dir, data_dir, tmp_path, **{"data.resolution": 36})
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: importing it raises ImportError
        with pytest.raises(ConfigError, match="'train.optimizer' = 'adamw8bit': needs bitsandbytes"):
            train(recipe(tiny_sd_dir, data_dir, tmp_path, **{"train.optimizer": "adamw8bit"}))
    with pytest.raises(ConfigError, match="'validation.eval_metrics' has 'clip': no such scorer"):
        train(recipe(tiny_sd_dir, data_dir, tmp_path, **{"validation.eval_metrics": "[clip]"}))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_other_architecture_is_refused(data_dir, tmp_path):
    from harness.models.tiny import build_tiny_sd

    odd = tmp_path / "odd"
    pipe = build_tiny_sd(0, unet={"cross_attention_dim": 64})
    pipe.save_pretrained(odd)
    with pytest.raises(CheckpointError, match="cross_attention_dim 64 != text encoder width 32"):
        train(recipe(odd, data_dir, tmp_path))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_sd_dir, data_dir, tmp_path, monkeypatch):
    import harness.train.loop as loop

    real = loop.diffusion_loss
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(loop, "diffusion_loss", flaky)
    r = recipe(tiny_sd_dir, data_dir, tmp_path, **{"train.max_steps": 5, "checkpoint.every_steps": 2})
    with pytest.raises(TrainingDiverged, match=r"step 3: training loss is nan .*step-00000002"):
        train(r)
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (run / "final").exists()
    # the fix-and-resume path the message suggests works from that checkpoint
    monkeypatch.setattr(loop, "diffusion_loss", real)
    final = train(r, resume="latest")
    assert json.loads((final.parent / "train_summary.json").read_text())["steps"] == 5


def test_resume_refuses_checkpoint_of_other_setup(tiny_sd_dir, data_dir, tmp_path):
    train(recipe(tiny_sd_dir, data_dir, tmp_path, **{"checkpoint.every_steps": 1, "lora.enabled": True,
                                                     "checkpoint.single_file": False}))
    with pytest.raises(CheckpointError, match="made for another model or training setup .*trainable"):
        train(recipe(tiny_sd_dir, data_dir, tmp_path, **{"train.max_steps": 4}), resume="latest")
    with pytest.raises(HarnessError, match="holds an earlier run's checkpoints.*--resume latest"):
        train(recipe(tiny_sd_dir, data_dir, tmp_path))


def test_early_stopping_on_a_scorer(tiny_sd_dir, data_dir, tmp_path):
    seen = []

    def constant(images, prompts):
        seen.append((len(images), tuple(prompts)))
        return 1.0

    r = recipe(tiny_sd_dir, data_dir, tmp_path, **{
        "train.max_steps": 10, "validation.every_steps": 1, "validation.prompts": "[a cat]",
        "validation.seeds": "[0, 1]", "validation.eval_metrics": "[const, drift]",
        "validation.early_stopping_metric": "eval/const", "validation.early_stopping_patience": 2})
    final = train(r, scorers={"const": constant})
    summary = json.loads((final.parent / "train_summary.json").read_text())
    assert summary["stopped"] == "early_stopping" and summary["steps"] == 2 and summary["best_step"] == 0
    # final/ holds the best validation's weights (step 0: the base), the stop's are in the checkpoint
    assert summary["final_weights_step"] == 0
    base, exported = unet_state_base(tiny_sd_dir), unet_state(final.parent)
    assert all(torch.equal(exported[k], v) for k, v in base.items())
    from safetensors.torch import load_file

    stopped = load_file(str(final.parent / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert any(not torch.equal(stopped[k], base[k]) for k in base if k in stopped)
    assert seen[0] == (2, ("a cat", "a cat"))
    records = [m for m in read_jsonl(final.parent / "metrics.jsonl") if "eval/drift" in m]
    assert records[0]["eval/drift"] == 0.0 and records[-1]["eval/drift"] > 0
    from PIL import Image

    png = Image.open(final.parent / "samples" / "step-00000001" / "p00-s1.png")
    assert png.text["prompt"] == "a cat" and png.text["seed"] == "1" and png.text["step"] == "1"


def test_two_stages_vpred_late_steps_ema_accum(tiny_sd_dir, data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    r = recipe(tiny_sd_dir, data_dir, tmp_path, **{
        "stages": "[{name: s1, epochs: 1, max_steps: 2, lr: 1.0e-3}, {name: s2, epochs: 1, max_steps: 2, "
                  "lr: 1.0e-5, t_min: 500, t_max: 750}]",
        "model.prediction_type": "v_prediction", "train.min_snr_gamma": 5.0, "train.noise_offset": 0.1,
        "train.grad_accum": 2, "train.batch_size": 2, "train.lr_scheduler": "constant", "train.warmup_steps": 0,
        "ema.enabled": True, "train.t_min": 750, "train.t_max": 1000, "logging.timing": True, "train.max_steps": 4})
    final = train(r)
    logged = [m for m in read_jsonl(final.parent / "metrics.jsonl") if "loss" in m]
    assert [(m["stage"], m["lr"]) for m in logged] == [("s1", 1e-3), ("s1", 1e-3), ("s2", 1e-5), ("s2", 1e-5)]
    assert all(m["time_unet_s"] > 0 and "time_data_s" in m for m in logged)
    assert (final.parent / "stages" / "s1" / "model_index.json").is_file()
    sched = json.loads((final / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    ckpts = sorted((final.parent / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-00000002", "step-00000004"]
    assert (ckpts[-1] / "ema.safetensors").is_file()
    assert json.loads((ckpts[0] / "trainer_state.json").read_text())["stage"] == 1


def test_clip_score_hook_from_metrics(tiny_sd_dir, zoo_dir, data_dir, tmp_path):
    r = recipe(tiny_sd_dir, data_dir, tmp_path, **{
        "train.max_steps": 1, "validation.prompts": "[a cat]", "validation.eval_metrics": "[clip_score]",
        "validation.scorer_models": f"{{clip_score: 'clip:{zoo_dir / 'clip'}'}}"})
    final = train(r)
    scores = [m["eval/clip_score"] for m in read_jsonl(final.parent / "metrics.jsonl") if "eval/clip_score" in m]
    assert len(scores) == 2 and all(0.0 <= s <= 100.0 for s in scores)
    with pytest.raises(ConfigError, match="set validation.scorer_models.artifact"):
        train(recipe(tiny_sd_dir, data_dir, tmp_path / "x", **{"validation.eval_metrics": "[artifact]"}))
